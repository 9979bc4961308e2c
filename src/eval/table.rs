//! The results table of the paper's Table 2 for the synthetic world: one row per model with
//! GenEval-like, OCR-like, PickScore-like and DeQA-like metrics and
//! `Avg = mean(GenEval, OCR, DeQA / 5, PickScore / 26)` (REFERENCE section 6).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::weights::write_text_atomic;

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
            (Some(g), Some(o), Some(p), Some(d)) => Some((g * g + o * o + (d / 5.0).powi(2) + (p / 26.0).powi(2)).sqrt() / 4.0),
            _ => None,
        };
        Self { geneval, ocr, pickscore, deqa, avg }
    }
}

impl EvalRow {
    pub fn new(model: &str, geneval: Option<f64>, ocr: Option<f64>, pickscore: Option<f64>, deqa: Option<f64>, seconds: f64) -> Self {
        let avg = match (geneval, ocr, pickscore, deqa) {
            (Some(g), Some(o), Some(p), Some(d)) => Some(paper_avg(g, o, p, d)),
            _ => None,
        };
        Self { model: model.to_string(), geneval, ocr, pickscore, deqa, avg, seconds, source: None, geneval_categories: BTreeMap::new(), stderr: None }
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
        const COLUMNS: [(&str, &str); 6] = [
            ("single_object", "Single obj."),
            ("two_object", "Two obj."),
            ("counting", "Counting"),
            ("colors", "Colors"),
            ("position", "Position"),
            ("color_attr", "Color attr."),
        ];
        let rows: Vec<&EvalRow> = self.rows.iter().filter(|r| !r.geneval_categories.is_empty()).collect();
        if rows.is_empty() {
            return String::new();
        }
        let mut out = String::from("\nGenEval by category:\n\n| model |");
        for (_, title) in COLUMNS {
            out.push_str(&format!(" {title} |"));
        }
        out.push_str(&format!("\n|---|{}\n", "---|".repeat(COLUMNS.len())));
        for r in rows {
            out.push_str(&format!("| {}{} |", r.model, source_mark(sources, r)));
            for (key, _) in COLUMNS {
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
    fn avg_reproduces_the_papers_rows() {
        // REFERENCE section 6: base .63/.59/4.07/21.64 -> .7165; Flow-OPD .93/.93/4.31/23.05 -> .9021.
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
