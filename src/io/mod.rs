//! Files on disk that are never half-written: text, PNG and whole folders written through a
//! temporary sibling and a rename ([`write_text_atomic`], [`write_png_atomic`],
//! [`replace_dir_atomic`]), the run log `metrics.jsonl` ([`metrics`]) and prompt files
//! ([`prompts`]).

pub mod checkpoint;
pub mod metrics;
pub mod prompts;

use std::path::{Path, PathBuf};

use thiserror::Error;

/// A file or folder that could not be written (or read back), with its path.
#[derive(Debug, Error)]
pub enum IoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Image { path: PathBuf, source: image::ImageError },
}

impl IoError {
    /// The file or folder at fault.
    pub fn path(&self) -> &Path {
        match self {
            IoError::Io { path, .. } | IoError::Image { path, .. } => path,
        }
    }

    /// An I/O error at `path`.
    pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
        move |source| IoError::Io { path: path.to_path_buf(), source }
    }
}

/// The temporary sibling `path` is written to before the rename: `.<name>.tmp-<pid>`.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_text_atomic(path: &Path, text: &str) -> Result<(), IoError> {
    let tmp = temporary_path(path);
    std::fs::write(&tmp, text).map_err(IoError::at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(IoError::at(path))
}

/// Writes a PNG through a temporary sibling and renames it into place.
pub fn write_png_atomic(path: &Path, image: &image::RgbImage) -> Result<(), IoError> {
    let tmp = temporary_path(path);
    image
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|source| IoError::Image { path: path.to_path_buf(), source })?;
    std::fs::rename(&tmp, path).map_err(IoError::at(path))
}

/// Writes a folder with `write` into a temporary sibling, then swaps it in for `dir`, so `dir`
/// is never half-written.
pub fn replace_dir_atomic<E: From<IoError>>(dir: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(IoError::at(parent))?;
    }
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp)?;
    let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(IoError::at(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(IoError::at(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
