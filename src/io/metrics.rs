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

    /// The log's length in bytes (every record is flushed as it is written).
    pub fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> std::io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Cuts the log back to its first `bytes` bytes (the records logged up to a checkpoint);
    /// later records are appended after them. A log shorter than `bytes` is an error: the
    /// records the checkpoint counted are gone.
    pub fn truncate(&mut self, bytes: u64) -> std::io::Result<()> {
        let len = self.len()?;
        if len < bytes {
            return Err(std::io::Error::other(format!(
                "{}: {len} bytes, shorter than the {bytes} the checkpoint was written after",
                self.path.display()
            )));
        }
        self.file.set_len(bytes)?;
        self.file.sync_all()
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
