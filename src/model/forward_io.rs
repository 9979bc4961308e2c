//! One transformer forward from a safetensors file of inputs to a safetensors file of outputs:
//! the tool a user runs to check ported weights against diffusers.
//!
//! Inputs: `hidden_states [B, C, H, W]`, `encoder_hidden_states [B, L, D]`,
//! `pooled_projections [B, P]`, `timestep [B]` (already `1000 * sigma`), any float dtype.
//! Output: `sample [B, C_out, H, W]` in f32.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::model::error::ModelError;
use crate::model::lora::ActiveAdapters;
use crate::model::mmdit::{InputDims, Mmdit};
use crate::model::weights::{MappedFile, NamedTensor, SaveDtype, StoredTensor, file, write_safetensors};

/// The four forward inputs as host tensors.
#[derive(Debug, Clone)]
pub struct ForwardInputs {
    pub hidden_states: (Vec<usize>, Vec<f32>),
    pub encoder_hidden_states: (Vec<usize>, Vec<f32>),
    pub pooled_projections: (Vec<usize>, Vec<f32>),
    pub timestep: (Vec<usize>, Vec<f32>),
}

/// Reads a float tensor of rank `rank` named `key` from `tensors`, erroring with the file and key.
fn take(
    path: &Path,
    tensors: &BTreeMap<String, StoredTensor>,
    key: &str,
    rank: usize,
    layout: &str,
) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    let input = |message: String| ModelError::Input { path: path.to_path_buf(), key: key.into(), message };
    let stored = tensors.get(key).ok_or_else(|| {
        input(format!("missing; the file has: {}", tensors.keys().cloned().collect::<Vec<_>>().join(", ")))
    })?;
    if stored.shape.len() != rank {
        return Err(input(format!("expected rank {rank} {layout}, found shape {:?}", stored.shape)));
    }
    if !file::is_float_dtype(stored.dtype) {
        return Err(input(format!("expected a float tensor, found {:?}", stored.dtype)));
    }
    Ok((stored.shape.clone(), stored.to_f32()))
}

impl ForwardInputs {
    /// Reads the four inputs from a safetensors file.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let (_, tensors) = MappedFile::open(path)?;
        let tensors: BTreeMap<String, StoredTensor> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok(Self {
            hidden_states: take(path, &tensors, "hidden_states", 4, "[B, C, H, W]")?,
            encoder_hidden_states: take(path, &tensors, "encoder_hidden_states", 3, "[B, L, D]")?,
            pooled_projections: take(path, &tensors, "pooled_projections", 2, "[B, P]")?,
            timestep: take(path, &tensors, "timestep", 1, "[B]")?,
        })
    }

    fn dims(&self) -> InputDims {
        fn arr<const N: usize>(v: &[usize]) -> [usize; N] {
            v.try_into().expect("rank checked on read")
        }
        InputDims {
            latents: arr(&self.hidden_states.0),
            text: arr(&self.encoder_hidden_states.0),
            pooled: arr(&self.pooled_projections.0),
            timestep: arr(&self.timestep.0),
        }
    }

    /// Checks the shapes against `model` (errors name `origin` and the input key) and runs it.
    pub fn run<B: Backend>(&self, model: &Mmdit<B>, origin: &Path, device: &B::Device) -> Result<Tensor<B, 4>, ModelError> {
        self.run_adapted(model, &ActiveAdapters::none(), origin, device)
    }

    /// [`ForwardInputs::run`] with LoRA adapters.
    pub fn run_adapted<B: Backend>(
        &self,
        model: &Mmdit<B>,
        adapters: &ActiveAdapters<'_, B>,
        origin: &Path,
        device: &B::Device,
    ) -> Result<Tensor<B, 4>, ModelError> {
        model.check_inputs(self.dims()).map_err(|(key, message)| ModelError::Input {
            path: origin.to_path_buf(),
            key: key.to_string(),
            message,
        })?;
        fn tensor<B: Backend, const D: usize>(t: &(Vec<usize>, Vec<f32>), device: &B::Device) -> Tensor<B, D> {
            Tensor::from_data(TensorData::new(t.1.clone(), t.0.clone()), device)
        }
        Ok(model.forward_adapted(
            tensor(&self.hidden_states, device),
            tensor(&self.encoder_hidden_states, device),
            tensor(&self.pooled_projections, device),
            tensor(&self.timestep, device),
            adapters,
        ))
    }
}

/// `model forward`: reads `inputs`, runs the model (with `adapters`), writes `sample` to
/// `output` (atomically).
pub fn forward_file<B: Backend>(
    model: &Mmdit<B>,
    adapters: &ActiveAdapters<'_, B>,
    inputs: &Path,
    output: &Path,
    device: &B::Device,
) -> Result<Vec<usize>, ModelError> {
    let sample = ForwardInputs::read(inputs)?.run_adapted(model, adapters, inputs, device)?;
    let shape = sample.dims().to_vec();
    let values = sample.into_data().convert::<f32>().into_vec::<f32>().expect("f32 output");
    write_safetensors(
        output,
        &[NamedTensor { name: "sample".into(), shape: shape.clone(), values }],
        SaveDtype::F32,
        None,
    )?;
    Ok(shape)
}
