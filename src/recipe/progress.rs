//! What a run has finished, for `--resume`: `runs/<run>/stages.json` lists every stage that
//! ended, with a key of its settings, whether it ran to its end (a stage stopped by its time
//! budget did not), the length of `metrics.jsonl` after it, and the SHA-256 of every file it
//! wrote into the run folder (the shared files every stage rewrites — the log, the results
//! table, the report, the curves — aside). A resumed run skips a finished stage only when its
//! key is unchanged and its files and result rows are still as it left them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Stage;
use crate::io::checkpoint::{FileSum, sha256_hex};
use crate::pipeline::Sd3Options;

/// The run's record of ended stages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub stages: Vec<Ended>,
}

/// One ended stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ended {
    pub index: usize,
    pub kind: String,
    /// [`stage_key`] of its settings.
    pub key: String,
    /// Whether it ran to its last step (not stopped by its time budget).
    pub complete: bool,
    /// Length of `metrics.jsonl` after it.
    pub metrics_bytes: u64,
    /// The files it wrote (relative to the run folder).
    pub files: BTreeMap<String, FileSum>,
    /// The result rows it wrote (an eval stage's row).
    #[serde(default)]
    pub rows: Vec<String>,
}

pub const FILE: &str = "stages.json";

impl Progress {
    /// The record in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).expect("progress serialises");
        crate::io::write_text_atomic(&dir.join(FILE), &text).map_err(|e| e.to_string())
    }

    pub fn ended(&self, index: usize) -> Option<&Ended> {
        self.stages.iter().find(|e| e.index == index)
    }
}

/// A hash of what a stage computes: its settings and the recipe's `[sd3]` options, without the
/// fields that only say how long or how often (`max_seconds`, `checkpoint_every`) or where a
/// copy goes (`export`), so a run resumes with a larger time budget.
pub fn stage_key(stage: &Stage, sd3: &Sd3Options) -> String {
    let mut table: toml::Table = toml::Value::try_from(stage)
        .ok()
        .and_then(|v| v.as_table().cloned())
        .expect("a stage serialises to a table");
    for budget in ["max_seconds", "checkpoint_every", "export"] {
        table.remove(budget);
    }
    let sd3 = toml::Value::try_from(sd3).expect("sd3 options serialise");
    sha256_hex(format!("{table}\n{sd3}").as_bytes())
}

/// Files every stage may rewrite, which belong to no one stage.
fn shared(relative: &Path) -> bool {
    let first = relative.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
    first.starts_with('.')
        || first.starts_with("metrics")
        || first.starts_with("curves")
        || ["results.json", "results.md", "report.html", "recipe.toml", FILE, "checkpoints"].contains(&first.as_str())
}

/// The run folder's own files (shared ones aside) with their length and modification time.
pub type Snapshot = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

pub fn snapshot(dir: &Path) -> Snapshot {
    let mut found = Snapshot::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(relative) = path.strip_prefix(dir).map(Path::to_path_buf) else { continue };
            if shared(&relative) {
                continue;
            }
            match entry.metadata() {
                Ok(m) if m.is_dir() => folders.push(path),
                Ok(m) => {
                    found.insert(relative, (m.len(), m.modified().ok()));
                }
                Err(_) => {}
            }
        }
    }
    found
}

/// The checksums of the files in `dir` that are new or changed since `before`.
pub fn written_since(dir: &Path, before: &Snapshot) -> Result<BTreeMap<String, FileSum>, String> {
    let mut files = BTreeMap::new();
    for (relative, seen) in snapshot(dir) {
        if before.get(&relative) == Some(&seen) {
            continue;
        }
        let path = dir.join(&relative);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        files.insert(relative.to_string_lossy().into_owned(), FileSum { bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) });
    }
    Ok(files)
}

/// Whether an ended stage's outputs are as it left them: `Err` says what changed.
pub fn verify(ended: &Ended, dir: &Path) -> Result<(), String> {
    for (name, sum) in &ended.files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.len() as u64 != sum.bytes || sha256_hex(&bytes) != sum.sha256 {
            return Err(format!("{} changed since the stage wrote it", path.display()));
        }
    }
    if !ended.rows.is_empty() {
        let path = dir.join("results.json");
        let table = crate::eval::ResultsTable::read_file(&path)?;
        for row in &ended.rows {
            table.row(row, &path)?;
        }
    }
    Ok(())
}
