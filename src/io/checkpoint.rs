//! Resumable checkpoints on disk: `<root>/<step>/` holds the trainer's files and a
//! `manifest.json` with each file's size and SHA-256, the step, the stage key and the trainer's
//! own figures. A checkpoint is written into a temporary sibling and renamed into place, the
//! two newest are kept, and on load a torn or corrupt one (a missing or short file, a checksum
//! that does not match, an unreadable manifest) is passed over for the previous one, with a
//! message saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::IoError;

/// How many checkpoints a stage keeps.
pub const KEPT: usize = 2;

/// What a checkpoint holds besides its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Steps (or iterations) done when it was written.
    pub step: usize,
    /// The stage it belongs to (a hash of the stage's settings): a checkpoint of another
    /// stage is never loaded.
    pub key: String,
    /// Length of the run's `metrics.jsonl` when it was written (a resumed run truncates the
    /// log back to it).
    pub metrics_bytes: u64,
    /// Seconds the stage had trained.
    pub seconds: f64,
    /// The trainer's counters and random streams.
    pub state: serde_json::Value,
    /// File name -> (bytes, SHA-256 in hex).
    pub files: BTreeMap<String, FileSum>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub sha256: String,
}

/// A checkpoint read back and verified.
pub struct Checkpoint {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Checkpoint {
    /// File `name`, or an error naming the checkpoint.
    pub fn file(&self, name: &str) -> Result<&[u8], String> {
        self.files.get(name).map(Vec::as_slice).ok_or_else(|| format!("{}: no `{name}` in this checkpoint", self.path.display()))
    }
}

/// SHA-256 of `bytes` in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The checkpoints of one stage: `<root>/<step, 8 digits>/`.
pub struct Checkpoints {
    pub root: PathBuf,
}

impl Checkpoints {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The checkpoint folders, newest first (temporary and foreign names are ignored).
    pub fn list(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name.len() == 8 && name.bytes().all(|b| b.is_ascii_digit())).then(|| (name.parse().ok(), e.path())).and_then(|(s, p)| Some((s?, p)))
            })
            .collect();
        found.sort_by(|a, b| b.0.cmp(&a.0));
        found
    }

    /// Writes checkpoint `manifest.step` with `files` (the manifest's `files` are filled in),
    /// atomically, then removes all but the [`KEPT`] newest.
    pub fn write(&self, mut manifest: Manifest, files: &[(String, Vec<u8>)]) -> Result<PathBuf, IoError> {
        let dir = self.root.join(format!("{:08}", manifest.step));
        manifest.files = files.iter().map(|(name, bytes)| (name.clone(), FileSum { bytes: bytes.len() as u64, sha256: sha256_hex(bytes) })).collect();
        super::replace_dir_atomic::<IoError>(&dir, |tmp| {
            std::fs::create_dir_all(tmp).map_err(IoError::at(tmp))?;
            for (name, bytes) in files {
                let path = tmp.join(name);
                std::fs::write(&path, bytes).map_err(IoError::at(&path))?;
            }
            let path = tmp.join("manifest.json");
            let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
            std::fs::write(&path, text).map_err(IoError::at(&path))?;
            // The data reach the disk before the rename makes the checkpoint visible.
            for name in files.iter().map(|(n, _)| n.as_str()).chain(["manifest.json"]) {
                let path = tmp.join(name);
                std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(IoError::at(&path))?;
            }
            Ok(())
        })?;
        for (_, old) in self.list().into_iter().skip(KEPT) {
            let _ = std::fs::remove_dir_all(old);
        }
        // What a killed writer left half-written.
        for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(dir)
    }

    /// Reads and verifies the checkpoint in `dir`.
    pub fn read(dir: &Path) -> Result<Checkpoint, String> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut files = BTreeMap::new();
        for (name, sum) in &manifest.files {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if bytes.len() as u64 != sum.bytes {
                return Err(format!("{}: {} bytes where the manifest says {}", path.display(), bytes.len(), sum.bytes));
            }
            if sha256_hex(&bytes) != sum.sha256 {
                return Err(format!("{}: the checksum does not match the manifest", path.display()));
            }
            files.insert(name.clone(), bytes);
        }
        Ok(Checkpoint { path: dir.to_path_buf(), manifest, files })
    }

    /// The newest checkpoint of stage `key` that verifies; a newer one that does not is
    /// reported (`warn`) and passed over. `None` when there is none.
    pub fn latest(&self, key: &str, mut warn: impl FnMut(String)) -> Option<Checkpoint> {
        for (_, dir) in self.list() {
            match Self::read(&dir) {
                Ok(c) if c.manifest.key == key => return Some(c),
                Ok(_) => warn(format!("{}: a checkpoint of a stage with other settings; not used", dir.display())),
                Err(e) => warn(format!("checkpoint {} is torn or corrupt ({e}); trying the previous one", dir.display())),
            }
        }
        None
    }

    /// Removes every checkpoint of the stage.
    pub fn clear(&self) -> Result<(), IoError> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(IoError::Io { path: self.root.clone(), source: e }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(step: usize) -> Manifest {
        Manifest { step, key: "k".into(), metrics_bytes: 7, seconds: 1.5, state: serde_json::json!({"n": step}), files: BTreeMap::new() }
    }

    #[test]
    fn keeps_the_two_newest_and_falls_back_past_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(dir.path().join("ck"));
        for step in [2, 4, 6] {
            ck.write(manifest(step), &[("a.bin".into(), vec![step as u8; 100])]).unwrap();
        }
        let steps: Vec<usize> = ck.list().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![6, 4], "the two newest are kept");
        let mut warnings = Vec::new();
        let c = ck.latest("k", |w| warnings.push(w)).unwrap();
        assert_eq!((c.manifest.step, c.file("a.bin").unwrap()[0]), (6, 6));
        assert!(warnings.is_empty());
        // One flipped byte in the newest: the previous one is used, and a warning names the newest.
        let newest = dir.path().join("ck/00000006/a.bin");
        let mut bytes = std::fs::read(&newest).unwrap();
        bytes[50] ^= 1;
        std::fs::write(&newest, bytes).unwrap();
        let c = ck.latest("k", |w| warnings.push(w)).unwrap();
        assert_eq!(c.manifest.step, 4);
        assert!(warnings.len() == 1 && warnings[0].contains("00000006") && warnings[0].contains("checksum"), "{warnings:?}");
        // A torn one (no manifest, as a crash before the rename would leave under the final
        // name only if the rename were not atomic) and a truncated file are passed over too.
        std::fs::remove_file(dir.path().join("ck/00000006/manifest.json")).unwrap();
        let file4 = dir.path().join("ck/00000004/a.bin");
        std::fs::write(&file4, [4u8; 10]).unwrap();
        warnings.clear();
        assert!(ck.latest("k", |w| warnings.push(w)).is_none());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[1].contains("10 bytes where the manifest says 100"), "{warnings:?}");
        // Another stage's checkpoint is never loaded.
        ck.write(manifest(8), &[]).unwrap();
        assert!(ck.latest("other", |_| {}).is_none());
    }
}
