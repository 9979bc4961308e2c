//! Run-time choice among the compiled backends: `--device cpu | wgpu[:N] | cuda[:N]`.
//!
//! Each backend is a cargo feature (`flex`, `wgpu`, `cuda`); code that should run on any of
//! them implements [`BackendTask`] once and [`dispatch`] monomorphises it for the chosen one.

use std::fmt;
use std::str::FromStr;

use crate::Backend;

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
            ("auto", None) => Ok(Self::auto()),
            ("cpu", None) => Ok(Self::Cpu),
            ("wgpu", index) => Ok(Self::Wgpu(index)),
            ("cuda", index) => Ok(Self::Cuda(index.unwrap_or(0))),
            _ => Err(format!("unknown device `{s}` (expected auto, cpu, wgpu, wgpu:N, cuda or cuda:N)")),
        }
    }
}

impl DeviceSpec {
    /// The default device (`--device auto`): `cuda:0` in a binary built with `--features cuda`
    /// when the CUDA driver reports a GPU, the CPU otherwise. A cuda binary that finds no GPU
    /// says so once on stderr, with the reason, and runs on the CPU.
    pub fn auto() -> Self {
        static CHOICE: std::sync::OnceLock<DeviceSpec> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            if !cfg!(feature = "cuda") {
                return first_compiled();
            }
            match cuda_device_count() {
                Ok(n) if n > 0 => Self::Cuda(0),
                found => {
                    let why = match found {
                        Ok(_) => "the CUDA driver reports no GPU".to_string(),
                        Err(e) => e,
                    };
                    let fallback = first_compiled();
                    eprintln!("flow-opd: built with cuda, but {why}; running on `{fallback}` (--device chooses)");
                    fallback
                }
            }
        })
    }
}

/// The first backend compiled in, in the order cpu (flex), wgpu, cuda.
pub fn first_compiled() -> DeviceSpec {
    if cfg!(feature = "flex") {
        DeviceSpec::Cpu
    } else if cfg!(feature = "wgpu") {
        DeviceSpec::Wgpu(None)
    } else {
        DeviceSpec::Cuda(0)
    }
}

/// GPUs the CUDA driver reports (`cuInit` + `cuDeviceGetCount` of `libcuda.so`, loaded at run
/// time; an error names what failed).
#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize, String> {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type Count = unsafe extern "C" fn(*mut i32) -> i32;
    let names = ["libcuda.so.1", "libcuda.so"];
    // SAFETY: loading the CUDA driver library runs its initialisers, as cubecl-cuda's own
    // loading of it does; the two symbols have the driver API's C signatures.
    unsafe {
        let library = names
            .iter()
            .find_map(|name| libloading::Library::new(name).ok())
            .ok_or_else(|| "no CUDA driver library (libcuda.so.1) was found".to_string())?;
        let init: libloading::Symbol<Init> = library.get(b"cuInit\0").map_err(|e| format!("libcuda has no cuInit: {e}"))?;
        let count: libloading::Symbol<Count> = library.get(b"cuDeviceGetCount\0").map_err(|e| format!("libcuda has no cuDeviceGetCount: {e}"))?;
        let status = init(0);
        if status != 0 {
            return Err(format!("cuInit failed with CUDA error {status}"));
        }
        let mut n = 0i32;
        let status = count(&mut n);
        if status != 0 {
            return Err(format!("cuDeviceGetCount failed with CUDA error {status}"));
        }
        Ok(n.max(0) as usize)
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> Result<usize, String> {
    Ok(0)
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

/// Work that runs on several devices of one backend (data-parallel training).
pub trait MultiDeviceTask {
    type Output;
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Self::Output;
}

/// Why a device list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceListError {
    #[error("no device given")]
    Empty,
    #[error("devices `{first}` and `{other}` are of different backends; data-parallel devices must share one")]
    Mixed { first: DeviceSpec, other: DeviceSpec },
    #[error(transparent)]
    NotCompiled(#[from] BackendNotCompiled),
}

/// Runs `task` on the backend and device `spec` names.
pub fn dispatch<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output, BackendNotCompiled> {
    struct One<T>(T);
    impl<T: BackendTask> MultiDeviceTask for One<T> {
        type Output = T::Output;
        fn run<B: Backend>(self, devices: Vec<B::Device>) -> T::Output {
            self.0.run::<B>(devices.into_iter().next().expect("one device"))
        }
    }
    dispatch_many(&[spec], One(task)).map_err(|e| match e {
        DeviceListError::NotCompiled(e) => e,
        other => unreachable!("one device: {other}"),
    })
}

/// Runs `task` on the devices `specs` name (one backend; a device may repeat: `cpu,cpu` is two
/// peers on the CPU).
#[allow(unreachable_code, unused_variables)]
pub fn dispatch_many<T: MultiDeviceTask>(specs: &[DeviceSpec], task: T) -> Result<T::Output, DeviceListError> {
    let first = *specs.first().ok_or(DeviceListError::Empty)?;
    let same_kind = |a: &DeviceSpec, b: &DeviceSpec| std::mem::discriminant(a) == std::mem::discriminant(b);
    if let Some(other) = specs.iter().find(|s| !same_kind(s, &first)) {
        return Err(DeviceListError::Mixed { first, other: *other });
    }
    match first {
        DeviceSpec::Cpu => {
            #[cfg(feature = "flex")]
            return Ok(task.run::<burn::backend::Flex>(specs.iter().map(|_| Default::default()).collect()));
            Err(not_compiled(first, "flex").into())
        }
        DeviceSpec::Wgpu(_) => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::wgpu::WgpuDevice;
                let devices = specs
                    .iter()
                    .map(|s| match s {
                        DeviceSpec::Wgpu(Some(i)) => WgpuDevice::DiscreteGpu(*i),
                        _ => WgpuDevice::DefaultDevice,
                    })
                    .collect();
                return Ok(task.run::<burn::backend::Wgpu>(devices));
            }
            Err(not_compiled(first, "wgpu").into())
        }
        DeviceSpec::Cuda(_) => {
            #[cfg(feature = "cuda")]
            {
                use burn::backend::cuda::CudaDevice;
                let devices = specs.iter().map(|s| CudaDevice { index: if let DeviceSpec::Cuda(i) = s { *i } else { 0 } }).collect();
                return Ok(task.run::<burn::backend::Cuda>(devices));
            }
            Err(not_compiled(first, "cuda").into())
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
        // Without a GPU (this machine, CI) `auto` is the CPU whatever the features.
        #[cfg(feature = "flex")]
        if cuda_device_count().unwrap_or(0) == 0 {
            assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        }
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("tpu"));
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains('x'));
    }

    #[test]
    fn device_lists_share_one_backend() {
        struct Count;
        impl MultiDeviceTask for Count {
            type Output = usize;
            fn run<B: Backend>(self, devices: Vec<B::Device>) -> usize {
                devices.len()
            }
        }
        let err = dispatch_many(&[DeviceSpec::Cpu, DeviceSpec::Cuda(1)], Count).unwrap_err().to_string();
        assert!(err.contains("`cpu`") && err.contains("`cuda:1`"), "{err}");
        assert!(matches!(dispatch_many(&[], Count), Err(DeviceListError::Empty)));
        #[cfg(feature = "flex")]
        assert_eq!(dispatch_many(&[DeviceSpec::Cpu, DeviceSpec::Cpu], Count).unwrap(), 2);
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
