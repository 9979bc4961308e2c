//! Prompt files: one prompt per line; blank lines and lines starting with `#` are skipped.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// A prompt file that could not be read or holds no prompt.
#[derive(Debug, Error)]
pub enum PromptFileError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no prompts (one per line)")]
    Empty { path: PathBuf },
}

/// Reads prompts from a file, one per line (blank lines and lines starting with `#` skipped).
pub fn read_prompt_file(path: &Path) -> Result<Vec<String>, PromptFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptFileError::Read { path: path.to_path_buf(), source })?;
    let prompts: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    if prompts.is_empty() {
        return Err(PromptFileError::Empty { path: path.to_path_buf() });
    }
    Ok(prompts)
}
