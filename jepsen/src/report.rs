//! The report of one run: a directory with the history, the nemesis
//! timeline, the checkers' verdicts, the run's metadata, a latency plot and
//! an `index.html` that links them. Every file is static and self-contained
//! (no external CSS, scripts or fonts), so the directory can be copied or
//! kept as a CI artifact as it is.
//!
//! The latency plot is SVG written directly rather than through a plotting
//! crate, so the build needs no font library: labels are SVG `<text>`
//! elements that the viewer renders.
//!
//! This module judges nothing; the verdicts come from the checkers. It is
//! longer than most modules because the HTML and SVG writers share the
//! fault-window and latency data and are only used here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::history::{self, Call, FaultAction, Op, OpType, Process};

/// One checker's verdict, as the report shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportVerdict {
    /// Checker name, e.g. "linearizable-register".
    pub checker: String,
    /// One of `VALIDITIES`: "valid", "invalid" or "unknown".
    pub validity: String,
    /// One line for people.
    pub summary: String,
    /// Checker-specific evidence, such as the anomalies found.
    pub details: serde_json::Value,
}

/// Metadata of a run, for people reading the report and for reproducing the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub name: String,
    pub seed: u64,
    /// The command line that reproduces the run.
    pub command: String,
    /// Wall-clock start, in seconds since the Unix epoch.
    pub started_unix: u64,
    pub duration_s: f64,
    pub nemeses: Vec<String>,
    pub workloads: Vec<String>,
    /// Faults injected, by nemesis name.
    pub fault_counts: BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

/// Paths of the files `write_report` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFiles {
    pub dir: PathBuf,
    pub index_html: PathBuf,
    pub history_jsonl: PathBuf,
    pub timeline_jsonl: PathBuf,
    pub timeline_txt: PathBuf,
    pub verdicts_json: PathBuf,
    pub run_json: PathBuf,
    pub latency_svg: PathBuf,
}

/// Client entries of one kind of operation (`f`), by entry type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCounts {
    pub invoke: u64,
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
    /// Invocations with no completion when the run ended. Checkers count
    /// them as `info`.
    pub unfinished: u64,
}

/// The span during which one fault may have been in effect: from the
/// invocation of its start to the completion of its matching stop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultWindow {
    pub nemesis: String,
    /// Detail of the start entry, e.g. "isolate n2 from n1,n3".
    pub detail: String,
    /// Seconds since the run started.
    pub start_s: f64,
    pub end_s: f64,
    /// False when no stop matched, so the window runs to the end of the run.
    pub healed: bool,
}

/// The validity values a `ReportVerdict` may carry.
pub const VALIDITIES: [&str; 3] = ["valid", "invalid", "unknown"];

/// Writes the report of one run into `dir`, creating it if needed, and
/// returns the paths written. Fails if a verdict's validity is not one of
/// `VALIDITIES` or a file cannot be written.
pub fn write_report(
    dir: &Path,
    info: &RunInfo,
    history: &[Op],
    verdicts: &[ReportVerdict],
) -> anyhow::Result<ReportFiles> {
    validate_verdicts(verdicts)?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("failed to create report directory {}", dir.display()))?;
    let files = ReportFiles::in_dir(dir);

    let end_ns = run_end_ns(info, history);
    let windows = fault_windows(history, end_ns);
    let counts = count_ops(history);
    let nemesis_ops: Vec<Op> = history
        .iter()
        .filter(|op| op.process == Process::Nemesis)
        .cloned()
        .collect();

    history::write_jsonl(&files.history_jsonl, history)
        .with_context(|| format!("failed to write {}", files.history_jsonl.display()))?;
    history::write_jsonl(&files.timeline_jsonl, &nemesis_ops)
        .with_context(|| format!("failed to write {}", files.timeline_jsonl.display()))?;
    write_file(&files.timeline_txt, &timeline_text(&nemesis_ops))?;
    write_file(
        &files.verdicts_json,
        &serde_json::to_string_pretty(verdicts)?,
    )?;
    let run_record = RunRecord {
        info,
        history_entries: history.len(),
        op_counts: &counts,
        fault_windows: &windows,
    };
    write_file(&files.run_json, &serde_json::to_string_pretty(&run_record)?)?;

    let points = latency_points(history);
    let title = format!("Client operation latency: {}", info.name);
    write_file(
        &files.latency_svg,
        &latency_svg(&title, &points, &windows, end_ns),
    )?;

    let page = IndexPage {
        info,
        verdicts,
        counts: &counts,
        windows: &windows,
        files: &files,
        plotted_ops: points.len(),
    };
    write_file(&files.index_html, &page.render())?;
    Ok(files)
}

/// Returns the run's overall validity: "invalid" if any checker found an anomaly,
/// "valid" if every checker (at least one) passed, otherwise "unknown".
pub fn combined_validity(verdicts: &[ReportVerdict]) -> &'static str {
    if verdicts.iter().any(|v| v.validity == "invalid") {
        "invalid"
    } else if !verdicts.is_empty() && verdicts.iter().all(|v| v.validity == "valid") {
        "valid"
    } else {
        "unknown"
    }
}

/// Counts client entries by operation kind (`f`) and entry type.
pub fn count_ops(history: &[Op]) -> BTreeMap<String, OpCounts> {
    let mut counts: BTreeMap<String, OpCounts> = BTreeMap::new();
    for op in history.iter().filter(|op| op.is_client()) {
        let entry = counts.entry(call_name(&op.call).to_string()).or_default();
        match op.kind {
            OpType::Invoke => entry.invoke += 1,
            OpType::Ok => entry.ok += 1,
            OpType::Fail => entry.fail += 1,
            OpType::Info => entry.info += 1,
        }
    }
    for pair in history::pairs(history)
        .iter()
        .filter(|p| p.completion.is_none())
    {
        counts
            .entry(call_name(&pair.invoke.call).to_string())
            .or_default()
            .unfinished += 1;
    }
    counts
}

/// Finds the fault windows in a history. A stop matches the oldest open
/// start of the same nemesis with the same detail, or else the oldest open
/// start of the same nemesis. A start or stop whose completion is `fail`
/// did not happen and is skipped. A start that no stop matches lasts until
/// `end_ns`. Windows are sorted by start time.
pub fn fault_windows(history: &[Op], end_ns: u64) -> Vec<FaultWindow> {
    let mut open: Vec<FaultWindow> = Vec::new();
    let mut closed: Vec<FaultWindow> = Vec::new();
    for action in fault_actions(history) {
        if action.outcome == Some(OpType::Fail) {
            continue;
        }
        match action.action {
            FaultAction::Start => open.push(FaultWindow {
                nemesis: action.nemesis.to_string(),
                detail: action.detail.to_string(),
                start_s: seconds(action.first_ns),
                end_s: seconds(end_ns),
                healed: false,
            }),
            FaultAction::Stop => {
                let same_nemesis = |w: &FaultWindow| w.nemesis == action.nemesis;
                let position = open
                    .iter()
                    .position(|w| same_nemesis(w) && w.detail == action.detail)
                    .or_else(|| open.iter().position(same_nemesis));
                if let Some(position) = position {
                    let mut window = open.remove(position);
                    window.end_s = seconds(action.last_ns);
                    window.healed = true;
                    closed.push(window);
                }
            }
        }
    }
    closed.extend(open);
    closed.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    closed
}

/// Returns the `f` name of a call, as the history's JSON spells it.
fn call_name(call: &Call) -> &'static str {
    match call {
        Call::Read { .. } => "read",
        Call::Write { .. } => "write",
        Call::Cas { .. } => "cas",
        Call::Create { .. } => "create",
        Call::ListInstances { .. } => "list_instances",
        Call::CreateNetwork { .. } => "create_network",
        Call::ListNetworks { .. } => "list_networks",
        Call::Fault { .. } => "fault",
    }
}

fn type_name(kind: OpType) -> &'static str {
    match kind {
        OpType::Invoke => "invoke",
        OpType::Ok => "ok",
        OpType::Fail => "fail",
        OpType::Info => "info",
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Returns the end of the run in nanoseconds: the later of the last entry and the
/// stated duration.
fn run_end_ns(info: &RunInfo, history: &[Op]) -> u64 {
    let last = history.iter().map(|op| op.time_ns).max().unwrap_or(0);
    let stated = if info.duration_s.is_finite() && info.duration_s > 0.0 {
        (info.duration_s * 1e9) as u64
    } else {
        0
    };
    last.max(stated)
}

fn validate_verdicts(verdicts: &[ReportVerdict]) -> anyhow::Result<()> {
    for verdict in verdicts {
        if !VALIDITIES.contains(&verdict.validity.as_str()) {
            anyhow::bail!(
                "invalid validity {:?} in the verdict of checker {:?}: expected one of {}",
                verdict.validity,
                verdict.checker,
                VALIDITIES.join(", ")
            );
        }
    }
    Ok(())
}

fn write_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("failed to write {}", path.display()))
}

impl ReportFiles {
    fn in_dir(dir: &Path) -> ReportFiles {
        ReportFiles {
            dir: dir.to_path_buf(),
            index_html: dir.join("index.html"),
            history_jsonl: dir.join("history.jsonl"),
            timeline_jsonl: dir.join("timeline.jsonl"),
            timeline_txt: dir.join("timeline.txt"),
            verdicts_json: dir.join("verdicts.json"),
            run_json: dir.join("run.json"),
            latency_svg: dir.join("latency.svg"),
        }
    }

    /// Lists the report's files, with what each contains, in the order the index lists them.
    fn described(&self) -> [(&Path, &'static str); 7] {
        [
            (
                &self.history_jsonl,
                "every entry of the history, one JSON object a line",
            ),
            (
                &self.timeline_jsonl,
                "the nemesis entries only, same format",
            ),
            (&self.timeline_txt, "the nemesis entries as text"),
            (&self.verdicts_json, "the checkers' verdicts"),
            (
                &self.run_json,
                "run information, operation counts and fault windows",
            ),
            (&self.latency_svg, "the latency plot"),
            (&self.index_html, "this page"),
        ]
    }
}

/// The contents of run.json.
#[derive(Serialize)]
struct RunRecord<'a> {
    #[serde(flatten)]
    info: &'a RunInfo,
    history_entries: usize,
    /// Client entries by `f`, then by type.
    op_counts: &'a BTreeMap<String, OpCounts>,
    fault_windows: &'a [FaultWindow],
}

/// One start or stop of a fault: its invocation and completion merged.
struct FaultActionEntry<'a> {
    nemesis: &'a str,
    action: FaultAction,
    detail: &'a str,
    first_ns: u64,
    last_ns: u64,
    /// The completion type, `None` while only the invocation was recorded.
    outcome: Option<OpType>,
}

/// Merges each nemesis completion into the oldest uncompleted invocation
/// with the same nemesis, action and detail. A completion without such an
/// invocation becomes an action of its own.
fn fault_actions(history: &[Op]) -> Vec<FaultActionEntry<'_>> {
    let mut actions: Vec<FaultActionEntry> = Vec::new();
    for op in history.iter().filter(|op| op.process == Process::Nemesis) {
        let Call::Fault {
            nemesis,
            action,
            detail,
        } = &op.call
        else {
            continue;
        };
        let same = |a: &FaultActionEntry| {
            a.outcome.is_none() && a.nemesis == nemesis && a.action == *action && a.detail == detail
        };
        let pending = actions.iter().position(same);
        match (op.kind, pending) {
            (OpType::Invoke, _) | (_, None) => actions.push(FaultActionEntry {
                nemesis,
                action: *action,
                detail,
                first_ns: op.time_ns,
                last_ns: op.time_ns,
                outcome: (op.kind != OpType::Invoke).then_some(op.kind),
            }),
            (kind, Some(position)) => {
                actions[position].last_ns = op.time_ns;
                actions[position].outcome = Some(kind);
            }
        }
    }
    actions
}

/// Formats one line per nemesis entry: time, action, entry type, nemesis, detail
/// and error, e.g. "  12.345s  start  invoke  partition-leader  isolate n2 from n1,n3".
fn timeline_text(nemesis_ops: &[Op]) -> String {
    let name_width = nemesis_ops
        .iter()
        .filter_map(|op| match &op.call {
            Call::Fault { nemesis, .. } => Some(nemesis.chars().count()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for op in nemesis_ops {
        let Call::Fault {
            nemesis,
            action,
            detail,
        } = &op.call
        else {
            continue;
        };
        let action = match action {
            FaultAction::Start => "start",
            FaultAction::Stop => "stop",
        };
        let mut line = format!(
            "{:>9.3}s  {:<5}  {:<6}  {:<name_width$}  {}",
            seconds(op.time_ns),
            action,
            type_name(op.kind),
            nemesis,
            detail
        );
        if let Some(error) = &op.error {
            line.push_str(&format!("  (error: {error})"));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Escapes text for HTML and SVG content and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

// ---------------------------------------------------------------------------
// Latency plot

/// One completed client operation on the plot.
struct LatencyPoint {
    /// Invocation time, seconds since the run started.
    time_s: f64,
    latency_ms: f64,
    f: &'static str,
    outcome: OpType,
}

fn latency_points(history: &[Op]) -> Vec<LatencyPoint> {
    history::pairs(history)
        .into_iter()
        .filter_map(|pair| {
            let completion = pair.completion?;
            Some(LatencyPoint {
                time_s: seconds(pair.invoke.time_ns),
                latency_ms: completion.time_ns.saturating_sub(pair.invoke.time_ns) as f64 / 1e6,
                f: call_name(&pair.invoke.call),
                outcome: completion.kind,
            })
        })
        .collect()
}

const SVG_WIDTH: f64 = 1200.0;
const SVG_HEIGHT: f64 = 630.0;
const PLOT_LEFT: f64 = 80.0;
const PLOT_RIGHT: f64 = 960.0;
const PLOT_TOP: f64 = 70.0;
const PLOT_BOTTOM: f64 = 570.0;
const LEGEND_LEFT: f64 = 985.0;
/// Rows of fault labels in the band between the title and the plot.
const LABEL_ROWS: usize = 2;

/// Lowest latency the log axis shows, in ms. Shorter latencies are drawn on
/// the axis.
const MIN_LATENCY_MS: f64 = 1e-3;

/// Outcomes in drawing order, so the rarer fail and info points lie on top.
const OUTCOMES: [(OpType, &str); 3] = [
    (OpType::Ok, "#2ca02c"),
    (OpType::Fail, "#d62728"),
    (OpType::Info, "#ff8c00"),
];

/// Fill colours of fault windows, one per nemesis in order of first fault.
const FAULT_COLOURS: [&str; 6] = [
    "#4e79a7", "#b07aa1", "#76b7b2", "#9c755f", "#79706e", "#edc948",
];

/// Marker shapes by `f`, centred on (0, 0).
const MARKERS: [(&str, &str); 8] = [
    ("read", r#"<circle id="m-read" r="2.6"/>"#),
    (
        "write",
        r#"<rect id="m-write" x="-2.3" y="-2.3" width="4.6" height="4.6"/>"#,
    ),
    ("cas", r#"<path id="m-cas" d="M0,-3.2L2.9,2.1L-2.9,2.1Z"/>"#),
    (
        "create",
        r#"<path id="m-create" d="M0,-3.4L3.4,0L0,3.4L-3.4,0Z"/>"#,
    ),
    (
        "list_instances",
        r#"<path id="m-list_instances" d="M-3.4,-1H3.4V1H-3.4Z"/>"#,
    ),
    (
        "create_network",
        r#"<path id="m-create_network" d="M0,3.2L2.9,-2.1L-2.9,-2.1Z"/>"#,
    ),
    (
        "list_networks",
        r#"<path id="m-list_networks" d="M-1,-3.4H1V3.4H-1ZM-3.4,-1H3.4V1H-3.4Z"/>"#,
    ),
    ("fault", r#"<path id="m-fault" d="M-1,-3.4H1V3.4H-1Z"/>"#),
];

/// Maps run time and latency to SVG coordinates: linear in time, log10 in
/// latency over whole decades.
struct Scale {
    time_max_s: f64,
    log_min: f64,
    log_max: f64,
}

impl Scale {
    fn new(points: &[LatencyPoint], end_ns: u64) -> Scale {
        let latencies = points.iter().map(|p| p.latency_ms.max(MIN_LATENCY_MS));
        let min = latencies.clone().fold(f64::INFINITY, f64::min);
        let max = latencies.fold(0.0, f64::max);
        let (log_min, log_max) = if points.is_empty() {
            (-1.0, 3.0)
        } else {
            let low = min.log10().floor();
            (low, max.log10().ceil().max(low + 1.0))
        };
        Scale {
            time_max_s: seconds(end_ns).max(1e-3),
            log_min,
            log_max,
        }
    }

    fn x(&self, time_s: f64) -> f64 {
        PLOT_LEFT + time_s / self.time_max_s * (PLOT_RIGHT - PLOT_LEFT)
    }

    fn y(&self, latency_ms: f64) -> f64 {
        let log = latency_ms.max(MIN_LATENCY_MS).log10();
        let fraction = (log - self.log_min) / (self.log_max - self.log_min);
        PLOT_BOTTOM - fraction * (PLOT_BOTTOM - PLOT_TOP)
    }
}

/// Renders the latency plot: one marker per completed client operation,
/// coloured by outcome and shaped by `f`, over shaded fault windows.
fn latency_svg(
    title: &str,
    points: &[LatencyPoint],
    windows: &[FaultWindow],
    end_ns: u64,
) -> String {
    let scale = Scale::new(points, end_ns);
    let nemeses = nemesis_colours(windows);
    let mut svg = format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" "#,
            r#"xmlns:xlink="http://www.w3.org/1999/xlink" "#,
            r#"width="{w}" height="{h}" viewBox="0 0 {w} {h}" "#,
            r#"font-family="sans-serif" font-size="12">"#,
            "\n<title>{title}</title>\n<defs>"
        ),
        w = SVG_WIDTH,
        h = SVG_HEIGHT,
        title = escape(title)
    );
    for (_, marker) in MARKERS {
        svg.push_str(marker);
    }
    svg.push_str("</defs>\n");
    svg.push_str(&format!(
        r#"<rect width="{SVG_WIDTH}" height="{SVG_HEIGHT}" fill="white"/>"#
    ));
    svg.push_str(&format!(
        "\n<text x=\"{PLOT_LEFT}\" y=\"24\" font-size=\"15\">{}</text>\n",
        escape(title)
    ));
    svg_fault_windows(&mut svg, &scale, windows, &nemeses);
    svg_axes(&mut svg, &scale);
    svg_points(&mut svg, &scale, points);
    svg_legend(&mut svg, points, &nemeses);
    svg.push_str("</svg>\n");
    svg
}

/// Assigns each nemesis a colour, in order of its first window.
fn nemesis_colours(windows: &[FaultWindow]) -> Vec<(&str, &'static str)> {
    let mut colours: Vec<(&str, &'static str)> = Vec::new();
    for window in windows {
        if !colours.iter().any(|(name, _)| *name == window.nemesis) {
            let colour = FAULT_COLOURS[colours.len() % FAULT_COLOURS.len()];
            colours.push((&window.nemesis, colour));
        }
    }
    colours
}

fn svg_fault_windows(
    svg: &mut String,
    scale: &Scale,
    windows: &[FaultWindow],
    nemeses: &[(&str, &str)],
) {
    let mut row_ends = [f64::NEG_INFINITY; LABEL_ROWS];
    for window in windows {
        let colour = nemeses
            .iter()
            .find(|(name, _)| *name == window.nemesis)
            .map_or(FAULT_COLOURS[0], |(_, colour)| *colour);
        let left = scale.x(window.start_s);
        let width = (scale.x(window.end_s) - left).max(1.0);
        let tooltip = format!(
            "{}: {} ({:.3}s to {:.3}s{})",
            window.nemesis,
            window.detail,
            window.start_s,
            window.end_s,
            if window.healed { "" } else { ", not healed" }
        );
        svg.push_str(&format!(
            concat!(
                r#"<rect class="fault" x="{:.1}" y="{}" width="{:.1}" height="{}" "#,
                r#"fill="{}" fill-opacity="0.18"><title>{}</title></rect>"#,
                "\n"
            ),
            left,
            PLOT_TOP,
            width,
            PLOT_BOTTOM - PLOT_TOP,
            colour,
            escape(&tooltip)
        ));

        let (label_x, anchor) = if left > PLOT_RIGHT - 120.0 {
            (left + width, "end")
        } else {
            (left, "start")
        };
        let label_y = PLOT_TOP
            - 6.0
            - 14.0 * label_row(&mut row_ends, label_x, anchor, &window.nemesis) as f64;
        svg.push_str(&format!(
            concat!(
                r#"<rect x="{:.1}" y="{}" width="{:.1}" height="3" fill="{}"/>"#,
                r#"<text class="fault-label" x="{:.1}" y="{:.1}" text-anchor="{}" "#,
                r#"font-size="11" fill="{}">{}</text>"#,
                "\n"
            ),
            left,
            PLOT_TOP - 3.0,
            width,
            colour,
            label_x,
            label_y,
            anchor,
            colour,
            escape(&window.nemesis)
        ));
    }
}

/// Picks the lowest label row, of `LABEL_ROWS` above the plot, where a label
/// does not overlap the one before it, and records the label's extent.
/// When every row is taken it uses the row that frees up first.
fn label_row(row_ends: &mut [f64; LABEL_ROWS], x: f64, anchor: &str, text: &str) -> usize {
    // An estimate: about 6.2 px per character at font size 11 in sans-serif.
    let width = text.chars().count() as f64 * 6.2;
    let (start, end) = if anchor == "end" {
        (x - width, x)
    } else {
        (x, x + width)
    };
    let row = row_ends
        .iter()
        .position(|row_end| *row_end + 6.0 <= start)
        .unwrap_or_else(|| {
            let earliest = row_ends.iter().copied().fold(f64::INFINITY, f64::min);
            row_ends
                .iter()
                .position(|row_end| *row_end == earliest)
                .unwrap_or(0)
        });
    row_ends[row] = end;
    row
}

fn svg_axes(svg: &mut String, scale: &Scale) {
    let grid = |svg: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, colour: &str| {
        svg.push_str(&format!(
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{colour}"/>"#
        ));
    };

    // Time axis: about ten ticks at 1, 2 or 5 times a power of ten.
    let step = tick_step(scale.time_max_s, 10.0);
    let ticks = (scale.time_max_s / step + 1e-9).floor() as u64;
    for tick in (0..=ticks).map(|i| i as f64 * step) {
        let x = scale.x(tick);
        grid(svg, x, PLOT_TOP, x, PLOT_BOTTOM, "#e4e4e4");
        svg.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            PLOT_BOTTOM + 16.0,
            format_tick(tick, step)
        ));
    }

    // Latency axis: a labelled line per decade, a faint one at 2 and 5.
    let decades = (scale.log_max - scale.log_min).round() as i32;
    for decade in 0..=decades {
        let exponent = scale.log_min as i32 + decade;
        let value = 10f64.powi(exponent);
        let y = scale.y(value);
        grid(svg, PLOT_LEFT, y, PLOT_RIGHT, y, "#d0d0d0");
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            PLOT_LEFT - 6.0,
            y + 4.0,
            format_tick(value, value)
        ));
        if decade < decades {
            for minor in [2.0, 5.0] {
                let y = scale.y(value * minor);
                grid(svg, PLOT_LEFT, y, PLOT_RIGHT, y, "#f0f0f0");
            }
        }
    }

    let middle_x = (PLOT_LEFT + PLOT_RIGHT) / 2.0;
    let middle_y = (PLOT_TOP + PLOT_BOTTOM) / 2.0;
    svg.push_str(&format!(
        concat!(
            r##"<rect x="{l}" y="{t}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##,
            "\n<text x=\"{mx}\" y=\"{ty}\" text-anchor=\"middle\">",
            "time since run start (s)</text>\n",
            "<text transform=\"translate(22,{my}) rotate(-90)\" text-anchor=\"middle\">",
            "latency (ms, log scale)</text>\n"
        ),
        l = PLOT_LEFT,
        t = PLOT_TOP,
        w = PLOT_RIGHT - PLOT_LEFT,
        h = PLOT_BOTTOM - PLOT_TOP,
        mx = middle_x,
        ty = PLOT_BOTTOM + 36.0,
        my = middle_y
    ));
}

/// Returns a tick spacing of 1, 2 or 5 times a power of ten giving about `target`
/// ticks over `range`.
fn tick_step(range: f64, target: f64) -> f64 {
    let raw = range / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    let factor = match raw / magnitude {
        n if n <= 1.0 => 1.0,
        n if n <= 2.0 => 2.0,
        n if n <= 5.0 => 5.0,
        _ => 10.0,
    };
    factor * magnitude
}

/// Formats a tick value with as many decimals as the step needs.
fn format_tick(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{value:.decimals$}")
}

/// Draws one `<use>` marker per point, grouped by outcome.
// NOTE: the plot keeps every point, about 60 bytes each, so a run with 100,000
// operations yields an SVG of about 6 MB; nothing is downsampled.
fn svg_points(svg: &mut String, scale: &Scale, points: &[LatencyPoint]) {
    for (outcome, colour) in OUTCOMES {
        svg.push_str(&format!(
            "<g class=\"points-{}\" fill=\"{colour}\" fill-opacity=\"0.6\">\n",
            type_name(outcome)
        ));
        for point in points.iter().filter(|p| p.outcome == outcome) {
            svg.push_str(&format!(
                "<use class=\"op\" xlink:href=\"#m-{}\" x=\"{:.1}\" y=\"{:.1}\"/>\n",
                point.f,
                scale.x(point.time_s),
                scale.y(point.latency_ms)
            ));
        }
        svg.push_str("</g>\n");
    }
    if points.is_empty() {
        svg.push_str(&format!(
            concat!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">",
                "no completed client operations</text>\n"
            ),
            (PLOT_LEFT + PLOT_RIGHT) / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0
        ));
    }
}

/// Draws the legend right of the plot: outcomes with their counts, marker
/// shapes of the `f`s present, and fault colours by nemesis.
fn svg_legend(svg: &mut String, points: &[LatencyPoint], nemeses: &[(&str, &str)]) {
    let mut y = PLOT_TOP + 10.0;
    let heading = |svg: &mut String, y: &mut f64, text: &str| {
        svg.push_str(&format!(
            "<text x=\"{LEGEND_LEFT}\" y=\"{:.1}\" font-weight=\"bold\">{text}</text>\n",
            *y
        ));
        *y += 18.0;
    };
    let entry = |svg: &mut String, y: &mut f64, marker: &str, text: &str| {
        svg.push_str(&format!(
            "{marker}<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            LEGEND_LEFT + 16.0,
            *y + 4.0,
            escape(text)
        ));
        *y += 17.0;
    };

    heading(svg, &mut y, "outcome");
    for (outcome, colour) in OUTCOMES {
        let count = points.iter().filter(|p| p.outcome == outcome).count();
        let marker = format!(
            r#"<circle cx="{:.1}" cy="{y:.1}" r="4" fill="{colour}"/>"#,
            LEGEND_LEFT + 5.0
        );
        entry(
            svg,
            &mut y,
            &marker,
            &format!("{} ({count})", type_name(outcome)),
        );
    }

    y += 8.0;
    heading(svg, &mut y, "operation");
    for (f, _) in MARKERS {
        let count = points.iter().filter(|p| p.f == f).count();
        if count == 0 {
            continue;
        }
        let marker = format!(
            r##"<use xlink:href="#m-{f}" x="{:.1}" y="{y:.1}" fill="#555"/>"##,
            LEGEND_LEFT + 5.0
        );
        entry(svg, &mut y, &marker, &format!("{f} ({count})"));
    }

    if !nemeses.is_empty() {
        y += 8.0;
        heading(svg, &mut y, "fault window");
    }
    for (nemesis, colour) in nemeses {
        let marker = format!(
            concat!(
                r#"<rect x="{}" y="{:.1}" width="10" height="10" "#,
                r#"fill="{}" fill-opacity="0.35"/>"#
            ),
            LEGEND_LEFT,
            y - 5.0,
            colour
        );
        entry(svg, &mut y, &marker, nemesis);
    }
}

// ---------------------------------------------------------------------------
// index.html

struct IndexPage<'a> {
    info: &'a RunInfo,
    verdicts: &'a [ReportVerdict],
    counts: &'a BTreeMap<String, OpCounts>,
    windows: &'a [FaultWindow],
    files: &'a ReportFiles,
    plotted_ops: usize,
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:1250px;color:#222}
table{border-collapse:collapse;margin:0.4em 0 1.4em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
td.number{text-align:right;font-variant-numeric:tabular-nums}
.valid{background:#d4f4d4}.invalid{background:#f8cccc}.unknown{background:#fbe6bd}
pre{background:#f6f6f6;padding:0.5em;overflow-x:auto}
img{max-width:100%;border:1px solid #ddd}
.verdict{display:inline-block;padding:4px 12px;font-weight:bold}";

impl IndexPage<'_> {
    fn render(&self) -> String {
        let overall = combined_validity(self.verdicts);
        let mut html = format!(
            concat!(
                "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
                "<title>ccs-jepsen run {name}</title>\n<style>\n{style}\n</style>\n</head>\n",
                "<body>\n<h1>ccs-jepsen run {name}</h1>\n",
                "<p>Overall: <span class=\"verdict {overall}\">{overall}</span></p>\n"
            ),
            name = escape(&self.info.name),
            style = STYLE,
            overall = overall
        );
        self.run_info(&mut html);
        self.verdict_table(&mut html);
        self.plot(&mut html);
        self.op_count_table(&mut html);
        self.fault_tables(&mut html);
        self.details(&mut html);
        self.file_list(&mut html);
        html.push_str("</body>\n</html>\n");
        html
    }

    fn run_info(&self, html: &mut String) {
        let info = self.info;
        let rows = [
            ("name", escape(&info.name)),
            ("seed", info.seed.to_string()),
            ("command", format!("<code>{}</code>", escape(&info.command))),
            (
                "started",
                format!(
                    "{} (Unix {})",
                    format_utc(info.started_unix),
                    info.started_unix
                ),
            ),
            ("duration", format!("{:.1} s", info.duration_s)),
            ("nemeses", escape(&info.nemeses.join(", "))),
            ("workloads", escape(&info.workloads.join(", "))),
        ];
        html.push_str("<h2>Run</h2>\n<table>\n");
        for (label, value) in rows {
            html.push_str(&format!("<tr><th>{label}</th><td>{value}</td></tr>\n"));
        }
        html.push_str("</table>\n");
        if !info.notes.is_empty() {
            html.push_str("<h3>Notes</h3>\n<ul>\n");
            for note in &info.notes {
                html.push_str(&format!("<li>{}</li>\n", escape(note)));
            }
            html.push_str("</ul>\n");
        }
    }

    fn verdict_table(&self, html: &mut String) {
        html.push_str("<h2>Verdicts</h2>\n");
        if self.verdicts.is_empty() {
            html.push_str("<p>No checker ran.</p>\n");
            return;
        }
        html.push_str("<table>\n<tr><th>checker</th><th>validity</th><th>summary</th></tr>\n");
        for verdict in self.verdicts {
            html.push_str(&format!(
                "<tr><td><a href=\"#checker-{anchor}\">{checker}</a></td>\
                 <td class=\"{validity}\">{validity}</td><td>{summary}</td></tr>\n",
                anchor = escape(&anchor_id(&verdict.checker)),
                checker = escape(&verdict.checker),
                validity = escape(&verdict.validity),
                summary = escape(&verdict.summary)
            ));
        }
        html.push_str("</table>\n");
    }

    fn plot(&self, html: &mut String) {
        html.push_str(&format!(
            concat!(
                "<h2>Latency</h2>\n<p>One marker per completed client operation ({}), ",
                "placed at its invocation time; shaded bands are fault windows, from the ",
                "start's invocation to the matching stop's completion.</p>\n",
                "<img src=\"latency.svg\" alt=\"latency of client operations over time\">\n"
            ),
            self.plotted_ops
        ));
    }

    fn op_count_table(&self, html: &mut String) {
        html.push_str(concat!(
            "<h2>Client operations</h2>\n<table>\n<tr><th>f</th><th>invoke</th><th>ok</th>",
            "<th>fail</th><th>info</th><th>unfinished</th></tr>\n"
        ));
        let mut total = OpCounts::default();
        for (f, counts) in self.counts {
            html.push_str(&op_count_row(&escape(f), counts));
            total.invoke += counts.invoke;
            total.ok += counts.ok;
            total.fail += counts.fail;
            total.info += counts.info;
            total.unfinished += counts.unfinished;
        }
        html.push_str(&op_count_row("<b>total</b>", &total));
        html.push_str("</table>\n");
    }

    fn fault_tables(&self, html: &mut String) {
        html.push_str("<h2>Faults</h2>\n<table>\n<tr><th>nemesis</th><th>faults</th></tr>\n");
        for (nemesis, count) in &self.info.fault_counts {
            html.push_str(&format!(
                "<tr><td>{}</td><td class=\"number\">{count}</td></tr>\n",
                escape(nemesis)
            ));
        }
        html.push_str("</table>\n<h3>Fault windows</h3>\n");
        if self.windows.is_empty() {
            html.push_str("<p>No fault windows in the history.</p>\n");
            return;
        }
        html.push_str(concat!(
            "<table>\n<tr><th>nemesis</th><th>detail</th><th>start (s)</th>",
            "<th>end (s)</th><th>length (s)</th></tr>\n"
        ));
        for window in self.windows {
            let end = if window.healed {
                format!("{:.3}", window.end_s)
            } else {
                format!("{:.3} (not healed)", window.end_s)
            };
            html.push_str(&format!(
                concat!(
                    "<tr><td>{}</td><td>{}</td><td class=\"number\">{:.3}</td>",
                    "<td class=\"number\">{}</td><td class=\"number\">{:.3}</td></tr>\n"
                ),
                escape(&window.nemesis),
                escape(&window.detail),
                window.start_s,
                end,
                window.end_s - window.start_s
            ));
        }
        html.push_str("</table>\n");
    }

    fn details(&self, html: &mut String) {
        html.push_str("<h2>Checker details</h2>\n");
        for verdict in self.verdicts {
            let details = serde_json::to_string_pretty(&verdict.details)
                .unwrap_or_else(|e| format!("details not serializable: {e}"));
            html.push_str(&format!(
                concat!(
                    "<h3 id=\"checker-{}\">{} <span class=\"verdict {}\">{}</span></h3>\n",
                    "<p>{}</p>\n<details><summary>details</summary><pre>{}</pre></details>\n"
                ),
                escape(&anchor_id(&verdict.checker)),
                escape(&verdict.checker),
                escape(&verdict.validity),
                escape(&verdict.validity),
                escape(&verdict.summary),
                escape(&details)
            ));
        }
    }

    fn file_list(&self, html: &mut String) {
        html.push_str("<h2>Files</h2>\n<ul>\n");
        for (path, description) in self.files.described() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // index.html is being written, so its size is not known yet.
            let size = match std::fs::metadata(path) {
                Ok(metadata) if path != self.files.index_html => {
                    format!(", {} bytes", metadata.len())
                }
                _ => String::new(),
            };
            html.push_str(&format!(
                "<li><a href=\"{name}\">{name}</a>: {description}{size}</li>\n",
                name = escape(&name)
            ));
        }
        html.push_str("</ul>\n");
    }
}

fn op_count_row(label: &str, counts: &OpCounts) -> String {
    let cells = [
        counts.invoke,
        counts.ok,
        counts.fail,
        counts.info,
        counts.unfinished,
    ]
    .map(|n| format!("<td class=\"number\">{n}</td>"))
    .concat();
    format!("<tr><td>{label}</td>{cells}</tr>\n")
}

/// Returns an HTML id for a checker's section: letters and digits kept, the rest `-`.
fn anchor_id(checker: &str) -> String {
    checker
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Formats seconds since the Unix epoch as "YYYY-MM-DD hh:mm:ss UTC".
fn format_utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let second_of_day = unix % 86_400;

    // Proleptic Gregorian calendar in 400-year eras counted from 0000-03-01,
    // so that the leap day falls at the end of each counted year.
    let from_march_0000 = days + 719_468;
    let era = from_march_0000 / 146_097;
    let day_of_era = from_march_0000 % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Process;
    use rand::{Rng, SeedableRng};

    /// A report directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("system clock is after 1970")
                .subsec_nanos();
            let dir = std::env::temp_dir().join(format!(
                "ccs-jepsen-report-{label}-{}-{nanos}",
                std::process::id()
            ));
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// History builder: `finish` sorts the entries by time and numbers them.
    #[derive(Default)]
    struct Builder {
        ops: Vec<Op>,
    }

    impl Builder {
        fn push(&mut self, ms: u64, process: Process, kind: OpType, call: Call) {
            let error =
                matches!(kind, OpType::Fail | OpType::Info).then(|| "timed out".to_string());
            self.ops.push(Op {
                index: self.ops.len() as u64,
                time_ns: ms * 1_000_000,
                process,
                kind,
                call,
                error,
            });
        }

        fn fault(
            &mut self,
            ms: u64,
            kind: OpType,
            nemesis: &str,
            action: FaultAction,
            detail: &str,
        ) {
            let call = Call::Fault {
                nemesis: nemesis.to_string(),
                action,
                detail: detail.to_string(),
            };
            self.push(ms, Process::Nemesis, kind, call);
        }

        /// Sorts by time and renumbers, as a recorder would have stamped them.
        fn finish(mut self) -> Vec<Op> {
            self.ops.sort_by_key(|op| op.time_ns);
            for (index, op) in self.ops.iter_mut().enumerate() {
                op.index = index as u64;
            }
            self.ops
        }
    }

    fn read(key: &str, value: Option<i64>) -> Call {
        Call::Read {
            key: key.to_string(),
            value,
        }
    }

    fn write(key: &str, value: i64) -> Call {
        Call::Write {
            key: key.to_string(),
            value,
        }
    }

    fn run_info(name: &str, duration_s: f64) -> RunInfo {
        RunInfo {
            name: name.to_string(),
            seed: 42,
            command: "ccs-jepsen run --seed 42 --time-limit 10s".to_string(),
            started_unix: 1_700_000_000,
            duration_s,
            nemeses: vec!["partition".to_string(), "kill".to_string()],
            workloads: vec!["register".to_string()],
            fault_counts: BTreeMap::from([("partition".to_string(), 1), ("kill".to_string(), 1)]),
            notes: vec!["synthetic history".to_string()],
        }
    }

    fn verdict(checker: &str, validity: &str, summary: &str) -> ReportVerdict {
        ReportVerdict {
            checker: checker.to_string(),
            validity: validity.to_string(),
            summary: summary.to_string(),
            details: serde_json::json!({ "anomalies": [] }),
        }
    }

    /// Four client operations (ok, fail, info, unfinished) and two fault
    /// windows, the second never healed.
    fn small_history() -> Vec<Op> {
        let mut b = Builder::default();
        b.push(100, Process::Client(0), OpType::Invoke, write("k", 1));
        b.push(112, Process::Client(0), OpType::Ok, write("k", 1));
        b.fault(
            1_000,
            OpType::Invoke,
            "partition",
            FaultAction::Start,
            "isolate n2 from n1,n3",
        );
        b.fault(
            1_010,
            OpType::Info,
            "partition",
            FaultAction::Start,
            "isolate n2 from n1,n3",
        );
        b.push(1_500, Process::Client(0), OpType::Invoke, read("k", None));
        b.push(1_530, Process::Client(0), OpType::Fail, read("k", None));
        b.fault(
            3_000,
            OpType::Invoke,
            "partition",
            FaultAction::Stop,
            "heal",
        );
        b.fault(3_020, OpType::Ok, "partition", FaultAction::Stop, "heal");
        b.push(4_000, Process::Client(1), OpType::Invoke, write("k", 2));
        b.fault(5_000, OpType::Invoke, "kill", FaultAction::Start, "kill n1");
        b.push(6_000, Process::Client(1), OpType::Info, write("k", 2));
        b.push(7_000, Process::Client(2), OpType::Invoke, read("k", None));
        b.finish()
    }

    #[test]
    fn report_small_history() {
        let dir = TempDir::new("small");
        let history = small_history();
        let verdicts = [
            verdict(
                "linearizable-register",
                "valid",
                "no anomaly in 3 operations",
            ),
            verdict("set", "invalid", "lost <script>alert(1)</script>"),
            verdict("ledger", "unknown", "ledger missing"),
        ];
        let files = write_report(&dir.0, &run_info("small", 8.0), &history, &verdicts)
            .expect("report written");

        for path in [
            &files.index_html,
            &files.history_jsonl,
            &files.timeline_jsonl,
            &files.timeline_txt,
            &files.verdicts_json,
            &files.run_json,
            &files.latency_svg,
        ] {
            assert!(path.is_file(), "{} missing", path.display());
        }

        let svg = std::fs::read_to_string(&files.latency_svg).expect("svg readable");
        assert_eq!(
            svg.matches(r#"<rect class="fault""#).count(),
            2,
            "one rect per window"
        );
        assert_eq!(
            svg.matches(r#"<use class="op""#).count(),
            3,
            "one point per completed op"
        );
        assert!(
            svg.contains(">partition</text>"),
            "window labelled by nemesis"
        );
        assert!(svg.contains(">kill</text>"), "window labelled by nemesis");

        let html = std::fs::read_to_string(&files.index_html).expect("html readable");
        for v in &verdicts {
            assert!(
                html.contains(&escape(&v.checker)),
                "{} not in index",
                v.checker
            );
        }
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "summary escaped"
        );
        assert!(!html.contains("<script"), "no raw script tag");
        assert!(html.contains(r#"<td class="invalid">invalid</td>"#));
        assert!(
            html.contains(r#"<span class="verdict invalid">invalid</span>"#),
            "overall"
        );
        assert!(html.contains(r#"<img src="latency.svg""#));
        assert!(html.contains(r#"<a href="timeline.txt">"#));
    }

    #[test]
    fn report_timeline_and_counts() {
        let dir = TempDir::new("timeline");
        let history = small_history();
        let files = write_report(&dir.0, &run_info("timeline", 8.0), &history, &[])
            .expect("report written");

        let timeline = std::fs::read_to_string(&files.timeline_txt).expect("timeline readable");
        let lines: Vec<&str> = timeline.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(
            lines[0],
            "    1.000s  start  invoke  partition  isolate n2 from n1,n3"
        );
        assert!(lines[1].ends_with("(error: timed out)"), "{}", lines[1]);
        let timeline_ops = history::read_jsonl(&files.timeline_jsonl).expect("timeline parses");
        assert!(timeline_ops.iter().all(|op| op.process == Process::Nemesis));
        assert_eq!(timeline_ops.len(), 5);
        assert_eq!(
            history::read_jsonl(&files.history_jsonl).expect("history parses"),
            history
        );

        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&files.run_json).expect("run.json"))
                .expect("run.json parses");
        assert_eq!(run["seed"], 42);
        assert_eq!(run["op_counts"]["write"]["invoke"], 2);
        assert_eq!(run["op_counts"]["write"]["ok"], 1);
        assert_eq!(run["op_counts"]["write"]["info"], 1);
        assert_eq!(run["op_counts"]["read"]["fail"], 1);
        assert_eq!(run["op_counts"]["read"]["unfinished"], 1);
        assert_eq!(run["fault_windows"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn fault_windows_matching() {
        let mut b = Builder::default();
        // Two concurrent windows of one nemesis, healed out of order by detail.
        b.fault(0, OpType::Invoke, "clock", FaultAction::Start, "skew n1");
        b.fault(100, OpType::Invoke, "clock", FaultAction::Start, "skew n2");
        b.fault(200, OpType::Ok, "clock", FaultAction::Start, "skew n2");
        b.fault(300, OpType::Invoke, "clock", FaultAction::Stop, "skew n2");
        b.fault(310, OpType::Ok, "clock", FaultAction::Stop, "skew n2");
        // A stop with another detail heals the oldest open window of its nemesis.
        b.fault(400, OpType::Invoke, "clock", FaultAction::Stop, "reset all");
        // A failed start opens nothing.
        b.fault(500, OpType::Invoke, "kill", FaultAction::Start, "kill n3");
        b.fault(510, OpType::Fail, "kill", FaultAction::Start, "kill n3");
        // A stop with nothing open is ignored, and an unmatched start runs to the end.
        b.fault(600, OpType::Invoke, "pause", FaultAction::Stop, "resume n1");
        b.fault(700, OpType::Invoke, "pause", FaultAction::Start, "pause n1");
        let windows = fault_windows(&b.finish(), 2_000_000_000);

        assert_eq!(windows.len(), 3, "{windows:?}");
        assert_eq!(
            (windows[0].detail.as_str(), windows[0].end_s),
            ("skew n1", 0.4)
        );
        assert_eq!(
            (windows[1].detail.as_str(), windows[1].end_s),
            ("skew n2", 0.31)
        );
        assert_eq!(windows[1].start_s, 0.1);
        assert_eq!(
            (windows[2].nemesis.as_str(), windows[2].end_s),
            ("pause", 2.0)
        );
        assert!(!windows[2].healed);
    }

    #[test]
    fn invalid_validity_rejected() {
        let dir = TempDir::new("rejected");
        let verdicts = [verdict("set", "passed", "")];
        let error = write_report(&dir.0, &run_info("x", 1.0), &[], &verdicts)
            .expect_err("validity must be checked");
        assert!(error.to_string().contains("\"passed\""), "{error}");
        assert!(!dir.0.exists(), "nothing written for rejected input");
    }

    #[test]
    fn label_rows_avoid_overlap() {
        let mut rows = [f64::NEG_INFINITY; LABEL_ROWS];
        // "kill" is about 25 px wide, so a label 10 px later needs the next row.
        assert_eq!(label_row(&mut rows, 100.0, "start", "kill"), 0);
        assert_eq!(label_row(&mut rows, 110.0, "start", "kill"), 1);
        // Both rows are taken: the row that frees up first is reused.
        assert_eq!(label_row(&mut rows, 115.0, "start", "kill"), 0);
        assert_eq!(label_row(&mut rows, 300.0, "start", "kill"), 0);
        // An end-anchored label extends to the left of its x.
        assert_eq!(label_row(&mut rows, 320.0, "end", "kill"), 1);
    }

    #[test]
    fn report_empty_history() {
        let dir = TempDir::new("empty");
        let files = write_report(&dir.0, &run_info("empty", 0.0), &[], &[]).expect("written");
        let svg = std::fs::read_to_string(&files.latency_svg).expect("svg readable");
        assert!(svg.contains("no completed client operations"));
        assert!(!svg.contains(r#"class="fault""#));
        let timeline = std::fs::read_to_string(&files.timeline_txt).expect("timeline");
        assert_eq!(timeline, "");
        let html = std::fs::read_to_string(&files.index_html).expect("html readable");
        assert!(html.contains("No checker ran."));
        assert!(html.contains(r#"<span class="verdict unknown">unknown</span>"#));
    }

    #[test]
    fn combined_validity_cases() {
        assert_eq!(combined_validity(&[]), "unknown");
        let valid = verdict("a", "valid", "");
        let unknown = verdict("b", "unknown", "");
        let invalid = verdict("c", "invalid", "");
        assert_eq!(combined_validity(&[valid.clone()]), "valid");
        assert_eq!(
            combined_validity(&[valid.clone(), unknown.clone()]),
            "unknown"
        );
        assert_eq!(combined_validity(&[valid, unknown, invalid]), "invalid");
    }

    #[test]
    fn format_utc_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    /// About 5000 operations over 60 s with four fault windows, latencies
    /// rising during faults. Set CCS_JEPSEN_KEEP_REPORT=1 to keep the
    /// directory for viewing; its path is printed.
    #[test]
    fn report_large_synthetic_history() {
        let dir = TempDir::new("large");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Builder::default();
        let faults = [
            (8_000, 16_000, "partition-leader", "isolate n1 from n2,n3"),
            (22_000, 27_000, "kill", "kill -9 n2"),
            (35_000, 44_000, "partition-halves", "split n1,n2 | n3"),
            (51_000, 56_000, "pause", "SIGSTOP n3"),
        ];
        for (start, stop, nemesis, detail) in faults {
            b.fault(start, OpType::Invoke, nemesis, FaultAction::Start, detail);
            b.fault(
                start + 15,
                OpType::Info,
                nemesis,
                FaultAction::Start,
                detail,
            );
            b.fault(stop, OpType::Invoke, nemesis, FaultAction::Stop, "heal");
            b.fault(stop + 20, OpType::Ok, nemesis, FaultAction::Stop, "heal");
        }

        let mut process = 0u64;
        let mut completed = 0usize;
        for i in 0..5_000u64 {
            let invoke_ms = i * 12 + rng.gen_range(0..12);
            let in_fault = faults
                .iter()
                .any(|(s, e, _, _)| (*s..*e).contains(&invoke_ms));
            let latency_ms = if in_fault && rng.gen_bool(0.3) {
                rng.gen_range(200..4_000)
            } else {
                rng.gen_range(1..30)
            };
            let call = match i % 4 {
                0 | 1 => read("k", None),
                2 => write("k", i as i64),
                _ => Call::Cas {
                    key: "k".to_string(),
                    from: 1,
                    to: 2,
                },
            };
            let outcome = match rng.gen_range(0..100) {
                0..=2 => OpType::Fail,
                3 if in_fault => OpType::Info,
                _ if in_fault && latency_ms > 3_000 => OpType::Info,
                _ => OpType::Ok,
            };
            b.push(
                invoke_ms,
                Process::Client(process),
                OpType::Invoke,
                call.clone(),
            );
            b.push(
                invoke_ms + latency_ms,
                Process::Client(process),
                outcome,
                call,
            );
            completed += 1;
            process += 1;
        }

        let info = run_info("synthetic-60s", 60.0);
        let verdicts = [verdict("linearizable-register", "valid", "synthetic")];
        let files = write_report(&dir.0, &info, &b.finish(), &verdicts).expect("report written");
        let svg = std::fs::read_to_string(&files.latency_svg).expect("svg readable");
        assert_eq!(svg.matches(r#"<use class="op""#).count(), completed);
        assert_eq!(svg.matches(r#"<rect class="fault""#).count(), 4);

        if std::env::var_os("CCS_JEPSEN_KEEP_REPORT").is_some() {
            let kept = dir.0.with_extension("kept");
            std::fs::rename(&dir.0, &kept).expect("report directory renamed");
            println!("report kept in {}", kept.display());
        }
    }
}
