//! Errors of model construction, weight loading and forward-input checks. Each names the file,
//! key or field at fault and, for shapes, what was expected and what was found.

use std::path::PathBuf;

/// Why a model could not be built, loaded, saved or run on the given inputs.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid model config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("unknown model preset `{0}` (expected one of: sd3_medium, sd35_medium, tiny)")]
    UnknownPreset(String),

    #[error("{path}: not a readable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: invalid shard index: {message}")]
    ShardIndex { path: PathBuf, message: String },

    #[error(
        "{path}: weight `{key}` is missing (expected shape {expected:?}); does the config match the weights?"
    )]
    MissingKey { path: PathBuf, key: String, expected: Vec<usize> },

    #[error(
        "{path}: unexpected weight `{key}` with shape {found:?}: the model built from the config has no such parameter; does the config match the weights?"
    )]
    UnexpectedKey { path: PathBuf, key: String, found: Vec<usize> },

    #[error("{path}: weight `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{path}: weight `{key}` has dtype {dtype}, expected one of F32, F16, BF16, F64")]
    UnsupportedDtype { path: PathBuf, key: String, dtype: String },

    #[error("{path}: weight `{key}`: {message}")]
    BadTensor { path: PathBuf, key: String, message: String },

    #[error("{path}: `{key}`: {message}")]
    Input { path: PathBuf, key: String, message: String },

    #[error("{path}: not a model: expected a diffusers folder with config.json, or a .safetensors file")]
    NotAModel { path: PathBuf },
}

impl From<crate::io::IoError> for ModelError {
    fn from(e: crate::io::IoError) -> Self {
        match e {
            crate::io::IoError::Io { path, source } => ModelError::Io { path, source },
            crate::io::IoError::Image { path, source } => ModelError::Io { path, source: std::io::Error::other(source) },
        }
    }
}
