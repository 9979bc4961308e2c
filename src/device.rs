//! Run-time choice among the compiled backends: `--device cpu | wgpu[:N] | cuda[:N]`.
//!
//! Each backend is a cargo feature (`flex`, `wgpu`, `cuda`); code that should run on any of
//! them implements [`BackendTask`] once and [`dispatch`] monomorphises it for the chosen one.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The pure-Rust CPU backend (`flex` feature).
    Cpu,
    /// A wgpu adapter (`wgpu` feature); `None` picks the default adapter (lavapipe on a
    /// machine without a GPU).
    Wgpu(Option<usize>),
    /// An NVIDIA GPU by index (`cuda` feature).
    Cuda(usize),
}

impl Default for DeviceSpec {
    fn default() -> Self {
        Self::Cpu
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(None) => write!(f, "wgpu"),
            Self::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| format!("device `{s}`: `{index}` is not a device index"))?;
                (kind, Some(index))
            }
            None => (s, None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(Self::Cpu),
            ("wgpu", index) => Ok(Self::Wgpu(index)),
            ("cuda", index) => Ok(Self::Cuda(index.unwrap_or(0))),
            _ => Err(format!("unknown device `{s}` (expected cpu, wgpu, wgpu:N, cuda or cuda:N)")),
        }
    }
}

/// Work that runs on any backend.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// The device was valid but its backend was not compiled in.
#[derive(Debug, thiserror::Error)]
#[error("device `{device}` needs flow-opd built with `--features {feature}`; this binary has: {compiled}")]
pub struct BackendNotCompiled {
    pub device: DeviceSpec,
    pub feature: &'static str,
    pub compiled: String,
}

/// Backends this binary was built with.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut list = Vec::new();
    if cfg!(feature = "flex") {
        list.push("flex (cpu)");
    }
    if cfg!(feature = "wgpu") {
        list.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        list.push("cuda");
    }
    list
}

fn not_compiled(device: DeviceSpec, feature: &'static str) -> BackendNotCompiled {
    BackendNotCompiled { device, feature, compiled: compiled_backends().join(", ") }
}

/// Runs `task` on the backend and device `spec` names.
#[allow(unreachable_code, unused_variables)]
pub fn dispatch<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output, BackendNotCompiled> {
    match spec {
        DeviceSpec::Cpu => {
            #[cfg(feature = "flex")]
            return Ok(task.run::<burn::backend::Flex>(Default::default()));
            Err(not_compiled(spec, "flex"))
        }
        DeviceSpec::Wgpu(index) => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::wgpu::WgpuDevice;
                let device = match index {
                    None => WgpuDevice::DefaultDevice,
                    Some(i) => WgpuDevice::DiscreteGpu(i),
                };
                return Ok(task.run::<burn::backend::Wgpu>(device));
            }
            Err(not_compiled(spec, "wgpu"))
        }
        DeviceSpec::Cuda(index) => {
            #[cfg(feature = "cuda")]
            return Ok(task.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice { index }));
            Err(not_compiled(spec, "cuda"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(None));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("tpu"));
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains('x'));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn asking_for_an_uncompiled_backend_names_the_feature() {
        struct Nothing;
        impl BackendTask for Nothing {
            type Output = ();
            fn run<B: Backend>(self, _device: B::Device) {}
        }
        let err = dispatch(DeviceSpec::Cuda(0), Nothing).unwrap_err().to_string();
        assert!(err.contains("--features cuda") && err.contains("cuda:0"), "{err}");
    }
}
