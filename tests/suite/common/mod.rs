//! Helpers shared by the integration tests: fixture paths, tensor files, error norms.
#![allow(dead_code)]

pub mod fake_server;

use std::path::{Path, PathBuf};

use flow_opd::model::weights::{MappedFile, NamedTensor, SaveDtype, write_safetensors};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmdit")
}

/// One forward case made by `tools/make_mmdit_fixtures.py`.
#[derive(Debug, serde::Deserialize)]
pub struct Case {
    pub case: String,
    pub model: String,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Case {
    pub fn inputs(&self) -> PathBuf {
        fixtures().join("cases").join(format!("{}.inputs.safetensors", self.case))
    }
    pub fn expected(&self) -> PathBuf {
        fixtures().join("cases").join(format!("{}.expected.safetensors", self.case))
    }
    pub fn model_dir(&self) -> PathBuf {
        fixtures().join(&self.model)
    }
}

pub fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases/cases.json")).expect("cases.json");
    serde_json::from_str(&text).expect("cases.json parses")
}

pub fn case(name: &str) -> Case {
    cases().into_iter().find(|c| c.case == name).unwrap_or_else(|| panic!("no fixture case {name}"))
}

/// Every tensor of a safetensors file as (name, shape, f32 values), sorted by name.
pub fn read_all(path: &Path) -> Vec<NamedTensor> {
    let (_, tensors) = MappedFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    tensors
        .iter()
        .map(|t| NamedTensor { name: t.name.clone(), shape: t.shape.clone(), values: t.to_f32() })
        .collect()
}

pub fn read_tensor(path: &Path, name: &str) -> NamedTensor {
    read_all(path).into_iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{}: no {name}", path.display()))
}

pub fn write(path: &Path, tensors: &[NamedTensor]) {
    write_safetensors(path, tensors, SaveDtype::F32, None).unwrap();
}

/// `||a - b|| / ||b||`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// A freshly initialised (seeded) tiny-world pipeline: the untrained default world model,
/// small enough for trainer smoke tests.
pub fn toy_world_pipeline(seed: u64) -> flow_opd::pipeline::world::Pipeline<burn::backend::Flex> {
    use burn::tensor::backend::Backend;
    type B = burn::backend::Flex;
    B::seed(&Default::default(), seed);
    flow_opd::pipeline::world::Pipeline::<B>::new_world(&Default::default(), &Default::default()).expect("default world model")
}

/// Fills the existing folder `dest` with the entries of `src` except `skip`: folders linked,
/// files copied (a cheap editable copy of a fixture pipeline folder).
pub fn link_folder_without(src: &Path, dest: &Path, skip: &str) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == skip {
            continue;
        }
        let target = dest.join(&name);
        if entry.path().is_dir() {
            std::os::unix::fs::symlink(entry.path(), target).unwrap();
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A two-iteration Flow-GRPO stage of the toy world over two partitions (composition, text).
pub const TOY_GRPO: &str = r#"
iterations = 2
beta = 0.04
seed = 3
rollout = { prompts = 2, group_size = 3, steps = 4, noise_level = 0.7, guidance = 2.0 }
lora = { rank = 2, alpha = 4.0 }
optim = { lr = 1e-2 }
partitions = [
  { tasks = ["composition"], rewards = { composition = 1.0 }, ratio = 1 },
  { tasks = ["text"], rewards = { text = 1.0 }, ratio = 1 },
]
"#;

/// A teacher adapter with non-zero B (seeded), so it changes the model.
pub fn toy_teacher<Bk: flow_opd::Backend>(p: &flow_opd::model::Mmdit<Bk>, seed: u64, device: &Bk::Device) -> flow_opd::model::lora::LoraAdapter<Bk> {
    let mut a = flow_opd::model::lora::LoraConfig::new(2, 4.0, flow_opd::model::lora::LoraTarget::FLOW_GRPO.to_vec()).init(p, seed, device);
    let mut noise = flow_opd::flow::SeededNoise::new(seed);
    for block in &mut a.blocks {
        for layer in block.layers.iter_mut().flatten() {
            let shape = layer.up.dims();
            let up: burn::tensor::Tensor<Bk, 2> = noise.sample(shape, device);
            layer.up = burn::module::Param::from_tensor(up * 0.3);
        }
    }
    a
}

/// Every f32 value of every safetensors file under `dir`, file by file in name order.
pub fn folder_values(dir: &Path) -> Vec<f32> {
    let mut files: Vec<_> = walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    assert!(!files.is_empty(), "no weights under {}", dir.display());
    files
        .iter()
        .flat_map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
            names.sort();
            names
                .into_iter()
                .flat_map(|n| st.tensor(&n).unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// Every file below `dir` (relative path and bytes), sorted.
pub fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                found.push((path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap()));
            }
        }
    }
    found.sort();
    found
}
