//! Memory-mapped safetensors files and lazily converted tensors read from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::TensorData;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::model::error::ModelError;

/// One safetensors file, memory-mapped and validated (header, offsets, length).
#[derive(Debug)]
pub struct MappedFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// A tensor inside a [`MappedFile`]: where its bytes are, its dtype and shape.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub file: Arc<MappedFile>,
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    offsets: (usize, usize),
}

impl MappedFile {
    /// Maps `path` and lists its tensors. A truncated or corrupt file is an error naming it.
    pub fn open(path: &Path) -> Result<(Arc<Self>, Vec<StoredTensor>), ModelError> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; as with every memory-mapped reader, the file must
        // not be truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bad = |e: safetensors::SafeTensorError| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: describe_safetensors_error(&e, mmap.len()),
        };
        // Full validation: header, offsets and that the data section has exactly the right length.
        SafeTensors::deserialize(&mmap).map_err(bad)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(bad)?;
        let data_start = 8 + header_len;
        let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        let mapped = Arc::new(Self { path: path.to_path_buf(), mmap, data_start });
        let tensors = infos
            .into_iter()
            .map(|(name, info)| StoredTensor {
                file: mapped.clone(),
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                offsets: info.data_offsets,
            })
            .collect();
        Ok((mapped, tensors))
    }
}

impl MappedFile {
    /// The file's `__metadata__` string map (empty if it has none).
    pub fn metadata(&self) -> std::collections::HashMap<String, String> {
        SafeTensors::read_metadata(&self.mmap)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer | E::HeaderTooSmall => {
            format!("the file is truncated or not safetensors ({len} bytes): {e}")
        }
        other => other.to_string(),
    }
}

/// Whether flow-opd can read this dtype as floating point weights.
pub fn is_float_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

impl StoredTensor {
    pub fn bytes(&self) -> &[u8] {
        let (start, end) = self.offsets;
        &self.file.mmap[self.file.data_start + start..self.file.data_start + end]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32, whatever the stored float dtype (checked beforehand with
    /// [`is_float_dtype`]).
    pub fn to_f32(&self) -> Vec<f32> {
        let bytes = self.bytes();
        match self.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            other => panic!("{}: `{}` has non-float dtype {other:?}", self.file.path.display(), self.name),
        }
    }
}

/// A tensor to load, possibly derived from a stored one: a block of rows (a third of a fused
/// `qkv`) or the stored tensor with its two halves along dim 0 swapped (Stability's final
/// modulations are `(shift, scale)`, diffusers' `(scale, shift)`).
#[derive(Debug, Clone)]
pub struct WeightSource {
    pub stored: StoredTensor,
    pub transform: Transform,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Identity,
    /// Block `index` of `count` equal blocks along dim 0.
    Rows { index: usize, count: usize },
    /// Second half along dim 0 first.
    SwapHalves,
}

impl WeightSource {
    pub fn identity(stored: StoredTensor) -> Self {
        Self { stored, transform: Transform::Identity }
    }

    /// Shape after the transform (PyTorch layout).
    pub fn shape(&self) -> Vec<usize> {
        let mut shape = self.stored.shape.clone();
        if let Transform::Rows { count, .. } = self.transform {
            shape[0] /= count;
        }
        shape
    }

    /// Shape in Burn's layout (2-D Linear weights transposed).
    pub fn burn_shape(&self, transpose: bool) -> Vec<usize> {
        let mut shape = self.shape();
        if transpose {
            shape.reverse();
        }
        shape
    }

    /// The values (PyTorch layout, f32) after the transform.
    pub fn values(&self) -> Vec<f32> {
        let all = self.stored.to_f32();
        let rows = self.stored.shape.first().copied().unwrap_or(1);
        let row_len = if rows == 0 { 0 } else { all.len() / rows };
        match self.transform {
            Transform::Identity => all,
            Transform::Rows { index, count } => {
                let block = rows / count * row_len;
                all[index * block..(index + 1) * block].to_vec()
            }
            Transform::SwapHalves => {
                let half = rows / 2 * row_len;
                let mut out = all[half..].to_vec();
                out.extend_from_slice(&all[..half]);
                out
            }
        }
    }

    /// Values as `TensorData` in Burn's layout: 2-D Linear weights `[out, in]` become `[in, out]`.
    pub fn to_burn_data(&self, transpose: bool) -> TensorData {
        let shape = self.shape();
        let values = self.values();
        if transpose {
            let (rows, cols) = (shape[0], shape[1]);
            let mut t = vec![0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = values[r * cols + c];
                }
            }
            TensorData::new(t, [cols, rows])
        } else {
            TensorData::new(values, shape)
        }
    }
}
