//! Run logging: one JSON object per line in `metrics.jsonl`, flushed after every record so an
//! interrupted run keeps everything it logged.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Appends records to `<run>/metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens (creating or appending to) `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `{"stage": stage, "step": step, ...fields}` as one line.
    pub fn log(&mut self, stage: &str, step: usize, fields: &[(&str, f64)]) -> std::io::Result<()> {
        let mut map = Map::new();
        map.insert("stage".into(), Value::from(stage));
        map.insert("step".into(), Value::from(step));
        for (k, v) in fields {
            map.insert((*k).into(), if v.is_finite() { Value::from(*v) } else { Value::Null });
        }
        writeln!(self.file, "{}", Value::Object(map))?;
        self.file.flush()
    }
}

/// Reads every record of a `metrics.jsonl` (lines that are not JSON objects are skipped).
pub fn read_metrics(path: &Path) -> std::io::Result<Vec<Map<String, Value>>> {
    let file = File::open(path)?;
    Ok(BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        })
        .collect())
}
