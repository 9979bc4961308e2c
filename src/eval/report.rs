//! `report.html`: one self-contained page per run folder (inline CSS, no scripts, no external
//! addresses) with the run's results table (`results.json`, as in `results.md`: metrics with
//! their standard errors, the Avg, GenEval by category, the sources of imported rows), its
//! training curves (`curves.png`) and its captioned sample grids ([`crate::eval::grid`]),
//! grouped by model. Images are referenced by paths relative to the run folder, so the page
//! opens from there (and keeps working when the folder is moved or copied).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::eval::table::{EvalRow, GENEVAL_CATEGORIES, ResultsTable, SOURCE_MARKS};
use crate::eval::sanitize;
use crate::world::Task;

/// File name of the report in a run folder.
pub const REPORT_FILE: &str = "report.html";

/// Deepest folder level below the run folder searched for grids.
const MAX_DEPTH: usize = 8;

/// Why a report could not be written; each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: not a folder", path.display())]
    NotAFolder { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot write: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// A sample grid image found in a run folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GridImage {
    /// The model part of the file name (a [`sanitize`]d model name).
    pub model: String,
    /// The task part of the file name, if it names one.
    pub task: Option<Task>,
    /// Path relative to the run folder, `/`-separated.
    pub relative: String,
    /// `captioned_*.png` (`true`) or a bare `grid_*.png` without a captioned twin (`false`).
    pub captioned: bool,
}

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A relative path as a URL path: `/`-separated, each byte outside `A-Za-z0-9-._~` percent-encoded.
fn url_path(relative: &Path) -> String {
    let parts: Vec<String> = relative
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .bytes()
                .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect()
        })
        .collect();
    parts.join("/")
}

/// `(model, task)` of a grid file stem after its `captioned_` / `grid_` prefix.
fn split_stem(rest: &str) -> (String, Option<Task>) {
    for task in Task::ALL {
        if let Some(model) = rest.strip_suffix(&format!("_{}", task.name())) {
            return (model.to_string(), Some(task));
        }
    }
    (rest.to_string(), None)
}

/// Every `captioned_*.png` under `run_dir` (hidden folders and symbolic links to folders are
/// skipped), plus each bare `grid_*.png` that has no captioned twin beside it, in path order.
pub fn find_grids(run_dir: &Path) -> Result<Vec<GridImage>, ReportError> {
    let mut files: Vec<PathBuf> = Vec::new();
    collect_pngs(run_dir, run_dir, 0, &mut files)?;
    files.sort();
    let names: std::collections::HashSet<&Path> = files.iter().map(PathBuf::as_path).collect();
    let mut grids = Vec::new();
    for file in &files {
        let Some(name) = file.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(stem) = name.strip_suffix(".png") else { continue };
        let (rest, captioned) = match (stem.strip_prefix("captioned_"), stem.strip_prefix("grid_")) {
            (Some(rest), _) => (rest, true),
            (None, Some(rest)) => {
                if names.contains(file.with_file_name(format!("captioned_{rest}.png")).as_path()) {
                    continue;
                }
                (rest, false)
            }
            _ => continue,
        };
        let (model, task) = split_stem(rest);
        grids.push(GridImage { model, task, relative: url_path(file), captioned });
    }
    Ok(grids)
}

/// Collects the PNG files under `dir` as paths relative to `root`.
fn collect_pngs(root: &Path, dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), ReportError> {
    let read = |e| ReportError::Read { path: dir.to_path_buf(), source: e };
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type().map_err(read)?;
        let path = entry.path();
        if kind.is_dir() {
            if depth < MAX_DEPTH {
                collect_pngs(root, &path, depth + 1, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "png") && path.is_file() {
            out.push(path.strip_prefix(root).expect("found under the root").to_path_buf());
        }
    }
    Ok(())
}

/// What `results.json` holds, for the page.
enum Results {
    Table(ResultsTable),
    Missing,
    Unreadable(String),
}

fn read_results(run_dir: &Path) -> Result<Results, ReportError> {
    let path = run_dir.join("results.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(match serde_json::from_str::<ResultsTable>(&text) {
            Ok(table) => Results::Table(table),
            Err(e) => Results::Unreadable(e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Results::Missing),
        Err(e) => Err(ReportError::Read { path, source: e }),
    }
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px 32px; color: #1a1a1a; background: #fafafa; max-width: 1800px; }
h1 { font-size: 1.6em; margin: 0 0 4px 0; }
h2 { font-size: 1.25em; margin: 32px 0 10px 0; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 24px 0 8px 0; }
nav { margin: 6px 0 0 0; font-size: 0.92em; color: #555; }
nav a { margin-right: 14px; color: #2255aa; }
table { border-collapse: collapse; margin: 6px 0 10px 0; background: #fff; font-size: 0.93em; }
th, td { border: 1px solid #d4d4d4; padding: 5px 10px; }
th { background: #eef0f3; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.model { text-align: left; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f6f7f9; }
td.best { font-weight: 700; }
.se { color: #777; font-size: 0.9em; }
.note { color: #555; font-size: 0.9em; margin: 4px 0; }
.missing { color: #8a5a00; background: #fff6e0; border: 1px solid #f0d9a0; padding: 8px 12px; display: inline-block; }
figure { margin: 0 0 18px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; background: #fff; display: block; }
figcaption { font-size: 0.92em; color: #555; margin: 0 0 4px 0; }
figcaption code { color: #333; }
";

/// One metric cell: the value and its standard error, as in `results.md`.
fn metric_cell(value: Option<f64>, se: Option<f64>, digits: usize, best: bool) -> String {
    let class = if best { "num best" } else { "num" };
    match (value, se) {
        (None, _) => format!("<td class=\"{class}\">-</td>"),
        (Some(v), None) => format!("<td class=\"{class}\">{v:.digits$}</td>"),
        (Some(v), Some(se)) => format!("<td class=\"{class}\">{v:.digits$} <span class=\"se\">± {se:.digits$}</span></td>"),
    }
}

/// The sources of imported rows in order of first appearance (their marks' order).
fn sources(table: &ResultsTable) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for s in table.rows.iter().filter_map(|r| r.source.as_deref()) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn mark(sources: &[&str], row: &EvalRow) -> String {
    row.source.as_deref().map_or(String::new(), |s| {
        let i = sources.iter().position(|x| *x == s).unwrap_or(0);
        format!(" {}", SOURCE_MARKS[i % SOURCE_MARKS.len()])
    })
}

fn results_html(table: &ResultsTable) -> String {
    let mut out = String::new();
    if table.rows.is_empty() {
        out.push_str("<p class=\"missing\">results.json has no rows yet.</p>\n");
        return out;
    }
    let sources = sources(table);
    type Metric = (&'static str, fn(&EvalRow) -> (Option<f64>, Option<f64>), usize);
    let metrics: [Metric; 5] = [
        ("GenEval", |r| (r.geneval, r.stderr.and_then(|s| s.geneval)), 3),
        ("OCR", |r| (r.ocr, r.stderr.and_then(|s| s.ocr)), 3),
        ("PickScore", |r| (r.pickscore, r.stderr.and_then(|s| s.pickscore)), 2),
        ("DeQA", |r| (r.deqa, r.stderr.and_then(|s| s.deqa)), 2),
        ("Avg", |r| (r.avg, r.stderr.and_then(|s| s.avg)), 4),
    ];
    // the best value of each column (every metric is higher-is-better), at the shown precision
    let best: Vec<Option<String>> = metrics
        .iter()
        .map(|(_, get, digits)| {
            let values: Vec<f64> = table.rows.iter().filter_map(|r| get(r).0).filter(|v| v.is_finite()).collect();
            (values.len() > 1).then(|| format!("{:.*}", *digits, values.iter().cloned().fold(f64::MIN, f64::max)))
        })
        .collect();
    out.push_str("<table class=\"results\">\n<thead><tr><th>model</th>");
    for (title, _, _) in &metrics {
        let _ = write!(out, "<th>{title}</th>");
    }
    out.push_str("<th>eval time</th></tr></thead>\n<tbody>\n");
    for r in &table.rows {
        let _ = write!(out, "<tr><td class=\"model\">{}{}</td>", escape_html(&r.model), mark(&sources, r));
        for ((_, get, digits), best) in metrics.iter().zip(&best) {
            let (v, se) = get(r);
            let is_best = matches!((v, best), (Some(v), Some(b)) if format!("{v:.*}", *digits) == *b);
            out.push_str(&metric_cell(v, se, *digits, is_best));
        }
        let time = if r.source.is_some() { "-".to_string() } else { format!("{:.0} s", r.seconds) };
        let _ = writeln!(out, "<td class=\"num\">{time}</td></tr>");
    }
    out.push_str("</tbody>\n</table>\n");
    if table.rows.iter().any(|r| r.stderr.is_some()) {
        out.push_str("<p class=\"note\">± one standard error of the mean over the row's test prompts (sample standard deviation of the per-image metric / sqrt(n)). Avg = mean(GenEval, OCR, DeQA / 5, PickScore / 26). Bold: the column's best.</p>\n");
    }
    let with_categories: Vec<&EvalRow> = table.rows.iter().filter(|r| !r.geneval_categories.is_empty()).collect();
    if !with_categories.is_empty() {
        out.push_str("<h3>GenEval by category</h3>\n<table class=\"categories\">\n<thead><tr><th>model</th>");
        for (_, title) in GENEVAL_CATEGORIES {
            let _ = write!(out, "<th>{title}</th>");
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for r in with_categories {
            let _ = write!(out, "<tr><td class=\"model\">{}{}</td>", escape_html(&r.model), mark(&sources, r));
            for (key, _) in GENEVAL_CATEGORIES {
                out.push_str(&metric_cell(r.geneval_categories.get(key).copied(), None, 3, false));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
    }
    for (source, m) in sources.iter().zip(SOURCE_MARKS.iter().cycle()) {
        let _ = writeln!(out, "<p class=\"note\">{m} imported from <code>{}</code> (same test prompts, seeds and sampler).</p>", escape_html(source));
    }
    out
}

fn grids_html(grids: &[GridImage], table: Option<&ResultsTable>) -> String {
    let mut out = String::new();
    if grids.is_empty() {
        out.push_str("<p class=\"missing\">No sample grids in this run folder.</p>\n");
        return out;
    }
    // a file's model part is the sanitized model name: show the table's spelling where it matches,
    // and the models in the table's order, then the others in path order
    let rows: Vec<&str> = table.map_or(Vec::new(), |t| t.rows.iter().map(|r| r.model.as_str()).collect());
    let display = |model: &str| rows.iter().find(|r| sanitize(r) == model).map_or(model.to_string(), |r| r.to_string());
    let order = |model: &str| rows.iter().position(|r| sanitize(r) == model).unwrap_or(usize::MAX);
    let mut groups: BTreeMap<(usize, usize), (String, Vec<&GridImage>)> = BTreeMap::new();
    let mut first_seen: Vec<String> = Vec::new();
    for g in grids {
        if !first_seen.contains(&g.model) {
            first_seen.push(g.model.clone());
        }
        let seen = first_seen.iter().position(|m| *m == g.model).expect("just added");
        groups.entry((order(&g.model), seen)).or_insert_with(|| (display(&g.model), Vec::new())).1.push(g);
    }
    for (_, (model, mut images)) in groups {
        images.sort_by_key(|g| (g.relative.rsplit_once('/').map_or(String::new(), |(d, _)| d.to_string()), g.task.map_or(usize::MAX, |t| t as usize)));
        let _ = writeln!(out, "<h3>{}</h3>", escape_html(&model));
        for g in images {
            let src = escape_html(&g.relative);
            let task = g.task.map_or("samples", |t| t.name());
            let what = if g.captioned { "" } else { " (no captions)" };
            let _ = writeln!(
                out,
                "<figure><figcaption><b>{task}</b>{what} &middot; <code>{src}</code></figcaption><a href=\"{src}\"><img src=\"{src}\" alt=\"{} {task} samples\"></a></figure>",
                escape_html(&model)
            );
        }
    }
    out
}

/// The report page of `run_dir` (see the module documentation).
pub fn render_report(run_dir: &Path) -> Result<String, ReportError> {
    if !run_dir.is_dir() {
        return Err(ReportError::NotAFolder { path: run_dir.to_path_buf() });
    }
    let name = std::fs::canonicalize(run_dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".to_string());
    let results = read_results(run_dir)?;
    let grids = find_grids(run_dir)?;
    let curves = run_dir.join("curves.png").is_file();

    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{} · flow-opd report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape_html(&name)
    );
    let _ = writeln!(html, "<h1>Run <code>{}</code></h1>", escape_html(&name));
    html.push_str("<nav><a href=\"#results\">Results</a>");
    if curves {
        html.push_str("<a href=\"#curves\">Curves</a>");
    }
    html.push_str("<a href=\"#samples\">Samples</a></nav>\n");

    html.push_str("<h2 id=\"results\">Results</h2>\n");
    let table = match &results {
        Results::Table(table) => {
            html.push_str(&results_html(table));
            Some(table)
        }
        Results::Missing => {
            html.push_str("<p class=\"missing\">No results.json in this run folder (no model has been evaluated yet).</p>\n");
            None
        }
        Results::Unreadable(message) => {
            let _ = writeln!(html, "<p class=\"missing\">results.json could not be read: {}</p>", escape_html(message));
            None
        }
    };
    if curves {
        html.push_str("<h2 id=\"curves\">Training curves</h2>\n<figure><a href=\"curves.png\"><img src=\"curves.png\" alt=\"training curves\"></a></figure>\n");
    }
    html.push_str("<h2 id=\"samples\">Samples</h2>\n");
    if grids.iter().any(|g| g.captioned) {
        html.push_str("<p class=\"note\">The first test prompts of each task with the model's sample; under each, the prompt and its verdict: composition <b style=\"color:#009600\">PASS</b> / <b style=\"color:#d20000\">FAIL</b>, the other tasks their metric.</p>\n");
    }
    html.push_str(&grids_html(&grids, table));
    html.push_str("</body>\n</html>\n");
    Ok(html)
}

/// Writes `run_dir/report.html` ([`render_report`]) through a temporary file in the same folder
/// and a rename; returns its path.
pub fn write_report(run_dir: &Path) -> Result<PathBuf, ReportError> {
    let html = render_report(run_dir)?;
    let path = run_dir.join(REPORT_FILE);
    let tmp = run_dir.join(format!(".{REPORT_FILE}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, html).map_err(|source| ReportError::Write { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, &path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ReportError::Write { path: path.clone(), source }
    })?;
    Ok(path)
}
