//! The results table of the paper's Table 2 for the synthetic world: one row per model with
//! GenEval-like, OCR-like, PickScore-like and DeQA-like metrics and
//! `Avg = mean(GenEval, OCR, DeQA / 5, PickScore / 26)` (docs/reference.md section 6).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::write_text_atomic;

/// One evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub model: String,
    /// Strict composition accuracy (GenEval-like), 0-1.
    pub geneval: Option<f64>,
    /// OCR score, 0-1.
    pub ocr: Option<f64>,
    /// Raw preference score (PickScore-like scale).
    pub pickscore: Option<f64>,
    /// Quality, 1-5 (DeQA-like).
    pub deqa: Option<f64>,
    /// The paper's Avg, if all four metrics are present.
    pub avg: Option<f64>,
    /// Wall time of the evaluation in seconds.
    pub seconds: f64,
    /// Where the row was evaluated when it was imported from another table (`None`: in this
    /// run); marked with its source's [`SOURCE_MARKS`] entry in `results.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// GenEval-like accuracy per category (`single_object`, `two_object`, `counting`,
    /// `colors`, `position`, `color_attr`) when the composition prompts are the world's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub geneval_categories: BTreeMap<String, f64>,
    /// One standard error of each metric's mean over the row's test prompts (`None` for rows
    /// written before standard errors were recorded); shown as `± se` in `results.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<StdErrors>,
    /// The metric of every test image, for paired comparisons between rows drawn on the same
    /// prompts and seeds ([`paired_difference`]); `None` for rows written before they were
    /// recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_image: Option<PerImage>,
}

/// A row's per-image metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerImage {
    /// What drew the images besides the model (seed, sampler, prompt source:
    /// `EvalConfig::setup`); rows pair only under the same setup.
    pub setup: String,
    /// Task name (`composition`, `text`, `preference`, `quality`) -> the metric of each test
    /// prompt's image, in prompt order.
    pub metrics: BTreeMap<String, Vec<f64>>,
}

/// A paired difference `a - b` of one metric between two rows evaluated on the same prompts and
/// seeds: the mean of the per-image differences and its standard error (their sample standard
/// deviation over `sqrt(n)`), much smaller than the rows' own errors when the two models draw
/// alike. For `avg` the tasks' differences combine with Avg's weights (independent prompt sets).
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// `geneval`, `ocr`, `pickscore`, `deqa` or `avg`.
    pub metric: &'static str,
    pub diff: f64,
    pub stderr: f64,
    /// Prompts per task (for `avg`: the smallest).
    pub count: usize,
}

/// The table's metrics, in the order of the table's columns: column, task, weight in Avg.
const METRICS: [(&str, &str, f64); 4] = [("geneval", "composition", 1.0), ("ocr", "text", 1.0), ("pickscore", "preference", 1.0 / 26.0), ("deqa", "quality", 1.0 / 5.0)];

/// Mean of the differences `a[i] - b[i]` of paired measurements (the same image, or the same
/// training iteration, under two models) and its standard error: sample standard deviation of
/// the differences / sqrt(n). Pairs beyond the shorter slice are ignored.
pub fn paired_mean(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    crate::eval::mean_and_stderr(&d)
}

/// Paired differences `a - b` per metric the two rows share, then Avg's (when they share all
/// four). Errors name the row at fault: no per-image metrics, another setup, another count.
pub fn paired_difference(a: &EvalRow, b: &EvalRow) -> Result<Vec<Difference>, String> {
    fn per_image(r: &EvalRow) -> Result<&PerImage, String> {
        r.per_image.as_ref().ok_or_else(|| format!("row `{}` has no per-image metrics (evaluated before they were recorded): evaluate it again", r.model))
    }
    let (pa, pb) = (per_image(a)?, per_image(b)?);
    if pa.setup != pb.setup {
        return Err(format!("rows `{}` and `{}` were not drawn alike, so their images do not pair: `{}` vs `{}`", a.model, b.model, pa.setup, pb.setup));
    }
    let mut out = Vec::new();
    let (mut avg, mut var, mut count) = (0.0, 0.0, usize::MAX);
    for (metric, task, weight) in METRICS {
        let (Some(xa), Some(xb)) = (pa.metrics.get(task), pb.metrics.get(task)) else { continue };
        if xa.len() != xb.len() {
            return Err(format!("task `{task}`: row `{}` has {} images, row `{}` {}: evaluate both on the same prompts", a.model, xa.len(), b.model, xb.len()));
        }
        let (diff, stderr) = paired_mean(xa, xb);
        avg += weight * diff / 4.0;
        var += (weight * stderr / 4.0).powi(2);
        count = count.min(xa.len());
        out.push(Difference { metric, diff, stderr, count: xa.len() });
    }
    if out.len() == METRICS.len() {
        out.push(Difference { metric: "avg", diff: avg, stderr: var.sqrt(), count });
    }
    Ok(out)
}

/// The paired comparison of rows `a` and `b` as a Markdown table (see [`paired_difference`]).
pub fn comparison_markdown(a: &EvalRow, b: &EvalRow) -> Result<String, String> {
    let diffs = paired_difference(a, b)?;
    let mut out = format!("| metric | {} | {} | difference | paired se | difference / se | images |\n|---|---|---|---|---|---|---|\n", a.model, b.model);
    for d in &diffs {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let z = if d.stderr > 0.0 { format!("{:+.1}", d.diff / d.stderr) } else { "-".to_string() };
        out.push_str(&format!("| {} | {} | {} | {:+.4} | {:.4} | {z} | {} |\n", d.metric, f(a.metric(d.metric)), f(b.metric(d.metric)), d.diff, d.stderr, d.count));
    }
    Ok(out)
}

/// The paper's Table 1 for a results table: every row against `base`, one column per metric
/// (and Avg), each cell the row's value and its paired difference from the base with the
/// difference's standard error (see [`paired_difference`]). Rows that do not pair with the
/// base are refused by name.
pub fn matrix_markdown(rows: &[&EvalRow], base: &EvalRow) -> Result<String, String> {
    const COLUMNS: [(&str, &str, usize); 5] = [("geneval", "GenEval", 3), ("ocr", "OCR", 3), ("pickscore", "PickScore", 2), ("deqa", "DeQA", 2), ("avg", "Avg", 4)];
    let mut out = format!("| model | {} |\n|---|{}\n", COLUMNS.map(|c| c.1).join(" | "), "---|".repeat(COLUMNS.len()));
    let f = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    out.push_str(&format!("| {} (base) | {} |\n", base.model, COLUMNS.map(|(m, _, d)| f(base.metric(m), d)).join(" | ")));
    for row in rows.iter().filter(|r| r.model != base.model) {
        let diffs = paired_difference(row, base)?;
        let cells = COLUMNS.map(|(metric, _, digits)| match diffs.iter().find(|d| d.metric == metric) {
            Some(d) => format!("{} ({:+.digits$} ± {:.digits$})", f(row.metric(metric), digits), d.diff, d.stderr),
            None => f(row.metric(metric), digits),
        });
        out.push_str(&format!("| {} | {} |\n", row.model, cells.join(" | ")));
    }
    out.push_str(&format!("\nIn brackets: the paired difference from `{}` on the same prompts and seeds ± its standard error.\n", base.model));
    Ok(out)
}

/// Standard errors of a row's metrics: each task's is the sample standard deviation of its
/// per-prompt metric over `sqrt(n)`; the Avg's follows from the tasks' (independent prompt
/// sets) through Avg's weights: `sqrt(se_g^2 + se_o^2 + (se_d / 5)^2 + (se_p / 26)^2) / 4`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StdErrors {
    pub geneval: Option<f64>,
    pub ocr: Option<f64>,
    pub pickscore: Option<f64>,
    pub deqa: Option<f64>,
    pub avg: Option<f64>,
}

impl StdErrors {
    /// The tasks' standard errors and the Avg's (when all four are present).
    pub fn new(geneval: Option<f64>, ocr: Option<f64>, pickscore: Option<f64>, deqa: Option<f64>) -> Self {
        let avg = match (geneval, ocr, pickscore, deqa) {
            (Some(g), Some(o), Some(p), Some(d)) => {
                let var: f64 = [g, o, p, d].into_iter().zip(METRICS).map(|(se, (_, _, weight))| (weight * se).powi(2)).sum();
                Some(var.sqrt() / 4.0)
            }
            _ => None,
        };
        Self { geneval, ocr, pickscore, deqa, avg }
    }
}

impl EvalRow {
    /// The row's value of a metric by its column key (`geneval`, `ocr`, `pickscore`, `deqa`;
    /// anything else is Avg).
    pub fn metric(&self, key: &str) -> Option<f64> {
        match key {
            "geneval" => self.geneval,
            "ocr" => self.ocr,
            "pickscore" => self.pickscore,
            "deqa" => self.deqa,
            _ => self.avg,
        }
    }

    pub fn new(model: &str, geneval: Option<f64>, ocr: Option<f64>, pickscore: Option<f64>, deqa: Option<f64>, seconds: f64) -> Self {
        let avg = match (geneval, ocr, pickscore, deqa) {
            (Some(g), Some(o), Some(p), Some(d)) => Some(paper_avg(g, o, p, d)),
            _ => None,
        };
        Self { model: model.to_string(), geneval, ocr, pickscore, deqa, avg, seconds, source: None, geneval_categories: BTreeMap::new(), stderr: None, per_image: None }
    }
}

/// `mean(GenEval, OCR, DeQA / 5, PickScore / 26)` (Table 2's Avg).
pub fn paper_avg(geneval: f64, ocr: f64, pickscore: f64, deqa: f64) -> f64 {
    (geneval + ocr + deqa / 5.0 + pickscore / 26.0) / 4.0
}

/// The marks of imported rows' sources in `results.md`, in order of first appearance.
pub const SOURCE_MARKS: [&str; 4] = ["†", "‡", "§", "¶"];

/// ` †` (or the mark of the row's source among `sources`, the table's sources in order of first
/// appearance) for an imported row, nothing for a row evaluated in this run.
fn source_mark(sources: &[&str], row: &EvalRow) -> String {
    row.source.as_deref().map_or(String::new(), |source| {
        let index = sources.iter().position(|s| *s == source).expect("a row's source is listed");
        format!(" {}", SOURCE_MARKS[index % SOURCE_MARKS.len()])
    })
}

/// The rows of `results.json`, rendered as `results.md`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultsTable {
    pub rows: Vec<EvalRow>,
}

/// GenEval's categories in its column order: (key in `geneval_categories`, column title).
pub const GENEVAL_CATEGORIES: [(&str, &str); 6] = [
    ("single_object", "Single obj."),
    ("two_object", "Two obj."),
    ("counting", "Counting"),
    ("colors", "Colors"),
    ("position", "Position"),
    ("color_attr", "Color attr."),
];

impl ResultsTable {
    /// Reads `dir/results.json` (empty if absent).
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join("results.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The row of model `name`; the error names `file` (where the table came from) and the
    /// table's rows.
    pub fn row(&self, name: &str, file: &Path) -> Result<&EvalRow, String> {
        self.rows.iter().find(|r| r.model == name).ok_or_else(|| {
            let known: Vec<&str> = self.rows.iter().map(|r| r.model.as_str()).collect();
            format!("{}: no row `{name}` (rows: {})", file.display(), known.join(", "))
        })
    }

    /// Adds `row`, replacing a row of the same model.
    pub fn upsert(&mut self, row: EvalRow) {
        match self.rows.iter_mut().find(|r| r.model == row.model) {
            Some(existing) => *existing = row,
            None => self.rows.push(row),
        }
    }

    /// The Markdown table; imported rows carry the mark of their source (see [`SOURCE_MARKS`]).
    pub fn markdown(&self) -> String {
        // `0.312 ± 0.036` where the row has the metric's standard error
        let f = |v: Option<f64>, se: Option<f64>, digits: usize| match (v, se) {
            (None, _) => "-".to_string(),
            (Some(v), None) => format!("{v:.digits$}"),
            (Some(v), Some(se)) => format!("{v:.digits$} ± {se:.digits$}"),
        };
        let sources = self.sources();
        let mut out = String::from(
            "| model | GenEval | OCR | PickScore | DeQA | Avg |\n|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let se = r.stderr.unwrap_or_default();
            out.push_str(&format!(
                "| {}{} | {} | {} | {} | {} | {} |\n",
                r.model,
                source_mark(&sources, r),
                f(r.geneval, se.geneval, 3),
                f(r.ocr, se.ocr, 3),
                f(r.pickscore, se.pickscore, 2),
                f(r.deqa, se.deqa, 2),
                f(r.avg, se.avg, 4)
            ));
        }
        if self.rows.iter().any(|r| r.stderr.is_some()) {
            out.push_str("\n± one standard error of the mean over the row's test prompts (sample standard deviation of the per-image metric / sqrt(n)).\n");
        }
        out.push_str(&self.categories_markdown(&sources));
        for (source, mark) in sources.iter().zip(SOURCE_MARKS.iter().cycle()) {
            out.push_str(&format!("\n{mark} imported from `{source}` (same test prompts, seeds and sampler).\n"));
        }
        out
    }

    /// The sources of imported rows, in the order they first appear.
    fn sources(&self) -> Vec<&str> {
        let mut sources: Vec<&str> = Vec::new();
        for source in self.rows.iter().filter_map(|r| r.source.as_deref()) {
            if !sources.contains(&source) {
                sources.push(source);
            }
        }
        sources
    }

    /// The GenEval-by-category table of the rows that have categories (GenEval's column
    /// order), or nothing when none has; `sources` as [`ResultsTable::sources`].
    fn categories_markdown(&self, sources: &[&str]) -> String {
        let rows: Vec<&EvalRow> = self.rows.iter().filter(|r| !r.geneval_categories.is_empty()).collect();
        if rows.is_empty() {
            return String::new();
        }
        let mut out = String::from("\nGenEval by category:\n\n| model |");
        for (_, title) in GENEVAL_CATEGORIES {
            out.push_str(&format!(" {title} |"));
        }
        out.push_str(&format!("\n|---|{}\n", "---|".repeat(GENEVAL_CATEGORIES.len())));
        for r in rows {
            out.push_str(&format!("| {}{} |", r.model, source_mark(sources, r)));
            for (key, _) in GENEVAL_CATEGORIES {
                out.push_str(&r.geneval_categories.get(key).map_or(" - |".to_string(), |v| format!(" {v:.3} |")));
            }
            out.push('\n');
        }
        out
    }

    /// Reads a `results.json` file (or the one in a run folder), erroring if it is absent.
    pub fn read_file(path: &Path) -> Result<Self, String> {
        let file = if path.is_dir() { path.join("results.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Writes only `results.json` at `path` (atomically), for tables that collect rows across
    /// recipes (e.g. `models/results.json`).
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        write_text_atomic(path, &serde_json::to_string_pretty(self).expect("json")).map_err(|e| e.to_string())
    }

    /// Adds `row` to the shared table at `path` (e.g. `models/results.json`), creating it if
    /// absent, under the table's lock (see [`Self::locked`]).
    pub fn upsert_file(path: &Path, row: EvalRow) -> Result<(), String> {
        Self::locked(path, || {
            let mut table = if path.exists() { Self::read_file(path)? } else { Self::default() };
            table.upsert(row);
            table.write_json(path)
        })
    }

    /// Adds `rows` to the table of the folder `dir` (`results.json` + `results.md`, e.g. a run
    /// or `flow-opd eval --out`), creating it if absent, under the table's lock; returns the
    /// table as written.
    pub fn upsert_dir(dir: &Path, rows: impl IntoIterator<Item = EvalRow>) -> Result<Self, String> {
        Self::locked(&dir.join("results.json"), || {
            let mut table = Self::read(dir)?;
            for row in rows {
                table.upsert(row);
            }
            table.write(dir)?;
            Ok(table)
        })
    }

    /// Runs the read-modify-write `update` of the table at `path` holding an exclusive lock on
    /// a hidden sibling file (`.results.json.lock`), so processes run side by side that add
    /// rows to the same table do not lose each other's rows.
    fn locked<T>(path: &Path, update: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let name = path.file_name().ok_or_else(|| format!("{}: not a file name", path.display()))?;
        let lock_path = parent.join(format!(".{}.lock", name.to_string_lossy()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        lock.lock().map_err(|e| format!("{}: cannot lock: {e}", lock_path.display()))?;
        update()
        // the lock is released when `lock` is closed
    }

    /// Writes `results.json` and `results.md` into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        write_text_atomic(&dir.join("results.json"), &serde_json::to_string_pretty(self).expect("json"))
            .map_err(|e| e.to_string())?;
        write_text_atomic(&dir.join("results.md"), &self.markdown()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_by_side_exports_keep_every_row() {
        // Eight writers add ten rows each to one shared table at the same time, through the
        // file (`models/results.json`) and through a folder's table (a run, `eval --out`); an
        // unlocked read-modify-write would drop rows that another writer added in between.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared").join("results.json");
        let folder = dir.path().join("run");
        std::thread::scope(|scope| {
            for w in 0..8 {
                let (path, folder) = (&path, &folder);
                scope.spawn(move || {
                    for i in 0..10 {
                        let row = EvalRow::new(&format!("writer {w} row {i}"), Some(0.1), None, None, None, 1.0);
                        ResultsTable::upsert_file(path, row.clone()).unwrap();
                        ResultsTable::upsert_dir(folder, [row]).unwrap();
                    }
                });
            }
        });
        assert_eq!(ResultsTable::read_file(&path).unwrap().rows.len(), 80);
        assert_eq!(ResultsTable::read(&folder).unwrap().rows.len(), 80);
        assert_eq!(std::fs::read_to_string(folder.join("results.md")).unwrap().matches("| writer ").count(), 80);
        // a row of an existing model is replaced, not added
        let replaced = EvalRow::new("writer 3 row 3", Some(0.5), None, None, None, 1.0);
        ResultsTable::upsert_file(&path, replaced.clone()).unwrap();
        let written = ResultsTable::upsert_dir(&folder, [replaced]).unwrap();
        for table in [ResultsTable::read_file(&path).unwrap(), ResultsTable::read(&folder).unwrap(), written] {
            assert_eq!(table.rows.len(), 80);
            assert_eq!(table.rows.iter().find(|r| r.model == "writer 3 row 3").unwrap().geneval, Some(0.5));
        }
    }

    #[test]
    fn avg_reproduces_the_papers_rows() {
        // docs/reference.md section 6: base .63/.59/4.07/21.64 -> .7165; Flow-OPD .93/.93/4.31/23.05 -> .9021.
        assert!((paper_avg(0.63, 0.59, 21.64, 4.07) - 0.7165).abs() < 5e-4);
        assert!((paper_avg(0.93, 0.93, 23.05, 4.31) - 0.9021).abs() < 5e-4);
    }

    #[test]
    fn standard_errors_combine_into_avgs_and_show_in_the_table() {
        // Avg = (g + o + d/5 + p/26) / 4 over independent prompt sets:
        // se = sqrt(0.04^2 + 0.01^2 + (0.1/5)^2 + (0.26/26)^2) / 4 = sqrt(0.0016 + 0.0001 + 0.0004 + 0.0001) / 4
        let se = StdErrors::new(Some(0.04), Some(0.01), Some(0.26), Some(0.1));
        assert!((se.avg.unwrap() - 0.0022f64.sqrt() / 4.0).abs() < 1e-12);
        assert_eq!(StdErrors::new(Some(0.04), None, Some(0.26), Some(0.1)).avg, None);
        let mut t = ResultsTable::default();
        t.upsert(EvalRow { stderr: Some(se), ..EvalRow::new("base", Some(0.5), Some(0.25), Some(20.0), Some(3.0), 1.0) });
        t.upsert(EvalRow::new("old", Some(0.5), None, None, None, 1.0));
        let md = t.markdown();
        assert!(md.contains("| base | 0.500 ± 0.040 | 0.250 ± 0.010 | 20.00 ± 0.26 | 3.00 ± 0.10 | 0.5298 ± 0.0117 |"), "{md}");
        assert!(md.contains("| old | 0.500 | - |") && md.contains("± one standard error"), "{md}");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<ResultsTable>(&json).unwrap(), t);
    }

    fn with_images(model: &str, setup: &str, metrics: [(&str, [f64; 4]); 4]) -> EvalRow {
        let mean = |t: &str| metrics.iter().find(|(k, _)| *k == t).map(|(_, v)| v.iter().sum::<f64>() / 4.0);
        let row = EvalRow::new(model, mean("composition"), mean("text"), mean("preference"), mean("quality"), 1.0);
        let metrics = metrics.into_iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        EvalRow { per_image: Some(PerImage { setup: setup.to_string(), metrics }), ..row }
    }

    #[test]
    fn paired_differences_follow_the_per_image_differences() {
        let a = with_images("a", "s", [("composition", [1.0, 1.0, 0.0, 1.0]), ("text", [0.5; 4]), ("preference", [26.0; 4]), ("quality", [5.0, 1.0, 5.0, 1.0])]);
        let b = with_images("b", "s", [("composition", [1.0, 0.0, 0.0, 0.0]), ("text", [0.25; 4]), ("preference", [0.0; 4]), ("quality", [0.0, 1.0, 0.0, 1.0])]);
        let d = paired_difference(&a, &b).unwrap();
        let get = |m: &str| d.iter().find(|x| x.metric == m).unwrap().clone();
        // composition: differences [0, 1, 0, 1]: mean 0.5, sample variance 1/3, se sqrt(1/12)
        assert_eq!(get("geneval").diff, 0.5);
        assert!((get("geneval").stderr - (1.0f64 / 12.0).sqrt()).abs() < 1e-12);
        // a constant difference has no error, however far apart the rows are
        assert_eq!((get("ocr").diff, get("ocr").stderr), (0.25, 0.0));
        assert_eq!((get("pickscore").diff, get("pickscore").stderr), (26.0, 0.0));
        // quality: differences [5, 0, 5, 0]: mean 2.5, se sqrt(25/12)
        assert!((get("deqa").stderr - (25.0f64 / 12.0).sqrt()).abs() < 1e-12);
        // Avg = (0.5 + 0.25 + 26/26 + 2.5/5) / 4; se = sqrt(1/12 + (sqrt(25/12)/5)^2) / 4 = sqrt(1/6) / 4
        let avg = get("avg");
        assert!((avg.diff - 0.5625).abs() < 1e-12 && (avg.stderr - (1.0f64 / 6.0).sqrt() / 4.0).abs() < 1e-12, "{avg:?}");
        // ... which is the difference of the rows' Avgs
        assert!((avg.diff - (a.avg.unwrap() - b.avg.unwrap())).abs() < 1e-12);
        let md = comparison_markdown(&a, &b).unwrap();
        assert!(md.contains("| metric | a | b |") && md.contains("| geneval | 0.7500 | 0.2500 | +0.5000 | 0.2887 | +1.7 | 4 |"), "{md}");
        assert!(paired_difference(&a, &a).unwrap().iter().all(|x| x.diff == 0.0 && x.stderr == 0.0));
    }

    /// Table 1: the base's values on its own line, every other row with its value and its paired
    /// difference from the base (worked by hand from the per-image metrics).
    #[test]
    fn the_matrix_sets_every_row_against_the_base() {
        let base = with_images("base", "s", [("composition", [1.0, 0.0, 0.0, 0.0]), ("text", [0.25; 4]), ("preference", [0.0; 4]), ("quality", [0.0, 1.0, 0.0, 1.0])]);
        let a = with_images("a", "s", [("composition", [1.0, 1.0, 0.0, 1.0]), ("text", [0.5; 4]), ("preference", [26.0; 4]), ("quality", [5.0, 1.0, 5.0, 1.0])]);
        let md = matrix_markdown(&[&base, &a], &base).unwrap();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| model | GenEval | OCR | PickScore | DeQA | Avg |");
        // base: GenEval 0.25, OCR 0.25, PickScore 0, DeQA 0.5, Avg (0.25 + 0.25 + 0 + 0.1) / 4
        assert_eq!(lines[2], "| base (base) | 0.250 | 0.250 | 0.00 | 0.50 | 0.1500 |");
        // a - base: GenEval 0.5 ± sqrt(1/12) = 0.289; OCR 0.25 ± 0; PickScore 26 ± 0;
        // DeQA 2.5 ± sqrt(25/12) = 1.44; Avg 0.5625 ± sqrt(1/6) / 4 = 0.1021
        assert_eq!(lines[3], "| a | 0.750 (+0.500 ± 0.289) | 0.500 (+0.250 ± 0.000) | 26.00 (+26.00 ± 0.00) | 3.00 (+2.50 ± 1.44) | 0.7125 (+0.5625 ± 0.1021) |");
        // the base's own line is not repeated, and rows that do not pair are refused
        assert_eq!(lines.iter().filter(|l| l.starts_with("| base")).count(), 1);
        let other = with_images("other", "seed 7", [("composition", [1.0; 4]), ("text", [0.0; 4]), ("preference", [20.0; 4]), ("quality", [3.0; 4])]);
        assert!(matrix_markdown(&[&other], &base).unwrap_err().contains("`other`"));
    }

    #[test]
    fn rows_that_do_not_pair_are_refused_by_name() {
        let four = [("composition", [1.0; 4]), ("text", [0.0; 4]), ("preference", [20.0; 4]), ("quality", [3.0; 4])];
        let a = with_images("a", "seed 0", four);
        let other_seed = with_images("b", "seed 7", four);
        let err = paired_difference(&a, &other_seed).unwrap_err();
        assert!(err.contains("`a`") && err.contains("`b`") && err.contains("seed 7"), "{err}");
        let old = EvalRow::new("old", Some(0.5), None, None, None, 1.0);
        let err = paired_difference(&a, &old).unwrap_err();
        assert!(err.contains("`old` has no per-image metrics"), "{err}");
        let mut short = with_images("short", "seed 0", four);
        short.per_image.as_mut().unwrap().metrics.get_mut("text").unwrap().pop();
        let err = paired_difference(&a, &short).unwrap_err();
        assert!(err.contains("task `text`") && err.contains("3"), "{err}");
    }

    #[test]
    fn rows_are_replaced_by_model_name() {
        let mut t = ResultsTable::default();
        t.upsert(EvalRow::new("base", Some(0.5), Some(0.5), Some(20.0), Some(3.0), 1.0));
        t.upsert(EvalRow::new("teacher", Some(0.9), None, None, None, 1.0));
        t.upsert(EvalRow::new("base", Some(0.6), Some(0.5), Some(20.0), Some(3.0), 1.0));
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].geneval, Some(0.6));
        assert!(t.markdown().contains("| teacher | 0.900 | - |"));
    }

    #[test]
    fn categories_get_their_own_table_and_survive_json() {
        let mut t = ResultsTable::default();
        t.upsert(EvalRow::new("old", Some(0.5), None, None, None, 1.0));
        let mut row = EvalRow::new("base", Some(0.5), None, None, None, 1.0);
        row.geneval_categories = [("position", 0.25), ("single_object", 1.0)].map(|(k, v)| (k.to_string(), v)).into();
        t.upsert(row);
        let md = t.markdown();
        assert!(md.contains("| model | Single obj. | Two obj. | Counting | Colors | Position | Color attr. |"), "{md}");
        assert!(md.contains("| base | 1.000 | - | - | - | 0.250 | - |"), "{md}");
        assert!(!md.contains("| old | 1.000"), "{md}");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<ResultsTable>(&json).unwrap(), t);
        // tables written before categories existed still read
        let old: ResultsTable = serde_json::from_str(r#"{"rows":[{"model":"m","geneval":0.1,"ocr":null,"pickscore":null,"deqa":null,"avg":null,"seconds":1.0}]}"#).unwrap();
        assert!(old.rows[0].geneval_categories.is_empty());
        assert!(!old.markdown().contains("by category"));
    }

    #[test]
    fn imported_rows_are_marked_with_their_source() {
        let mut t = ResultsTable::default();
        t.upsert(EvalRow { source: Some("models/results.json".into()), ..EvalRow::new("teacher", Some(0.9), None, None, None, 1.0) });
        t.upsert(EvalRow::new("student", Some(0.8), None, None, None, 1.0));
        let md = t.markdown();
        assert!(md.contains("| teacher † | 0.900 |") && md.contains("| student | 0.800 |"), "{md}");
        assert!(md.contains("† imported from `models/results.json`"), "{md}");
        // rows from a second source get the next mark, in both tables and the footnotes
        t.upsert(EvalRow { source: Some("runs/merge_opd".into()), ..EvalRow::new("opd", Some(0.7), None, None, None, 1.0) });
        let md = t.markdown();
        assert!(md.contains("| teacher † | 0.900 |") && md.contains("| opd ‡ | 0.700 |"), "{md}");
        assert!(md.contains("\n‡ imported from `runs/merge_opd`") && md.matches("imported from").count() == 2, "{md}");
        let dir = tempfile::tempdir().unwrap();
        t.write_json(&dir.path().join("sub/results.json")).unwrap();
        assert_eq!(ResultsTable::read_file(&dir.path().join("sub")).unwrap(), t);
        let err = ResultsTable::read_file(&dir.path().join("missing.json")).unwrap_err();
        assert!(err.contains("missing.json"), "{err}");
    }
}
