//! The `flow-opd` command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flow_opd::Backend;
use clap::{Args, Parser, Subcommand};

use flow_opd::flow::checks;
use flow_opd::device::{BackendTask, DeviceSpec, MultiDeviceTask, dispatch, dispatch_many};
use flow_opd::model::MmditConfig;
use flow_opd::model::lora::{ActiveAdapters, load_lora};
use flow_opd::model::forward_io::forward_file;
use flow_opd::model::weights::{Layout, ModelSource, SaveDtype, manifest, save_diffusers};

/// The paths a recipe names as `$model`, `$teachers` and `$prompts`.
#[derive(Args)]
struct RecipeInputs {
    /// The model folder a recipe names as "$model" (e.g. a diffusers SD3.5-Medium folder
    /// for recipes/sd35m/*).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Teacher adapters a recipe names as "$teachers" (a folder holding one adapter per
    /// task, e.g. runs/sd35m_teachers).
    #[arg(long)]
    teachers: Option<PathBuf>,
    /// Prompt files a recipe names as "$prompts" (e.g. a folder with geneval.txt, ocr.txt,
    /// pickscore.txt, one prompt per line).
    #[arg(long)]
    prompts: Option<PathBuf>,
}

/// Multi-node data parallelism (docs/distributed.md), as torchrun launches it: every node runs
/// the same command with its own `--node-rank`.
#[derive(Args)]
struct NodeArgs {
    /// The number of nodes (machines) training together; their devices form one data-parallel
    /// group.
    #[arg(long, env = "FLOW_OPD_NODES")]
    nodes: Option<usize>,
    /// This node's rank, 0 to N-1: node 0 starts the coordinator and writes runs/<name>/.
    #[arg(long, env = "FLOW_OPD_NODE_RANK")]
    node_rank: Option<usize>,
    /// HOST:PORT where node 0 runs the coordinator (burn-collective's global orchestrator).
    #[arg(long, env = "FLOW_OPD_COORDINATOR")]
    coordinator: Option<String>,
    /// The address other nodes reach this node at [default: the address of the interface that
    /// reaches the coordinator].
    #[arg(long, env = "FLOW_OPD_NODE_HOST")]
    node_host: Option<String>,
    /// This node's port for tensor transfers between nodes [default: the coordinator's port +
    /// 1 + the node's rank].
    #[arg(long, env = "FLOW_OPD_NODE_PORT")]
    node_port: Option<u16>,
    /// Seconds a node waits for the others in a collective step before it ends with an error
    /// naming the lost node [default: 300].
    #[arg(long, env = "FLOW_OPD_NODE_TIMEOUT")]
    node_timeout: Option<f64>,
    /// How nodes all-reduce gradients and figures: ring, tree, tree:N or centralized
    /// [default: ring].
    #[arg(long, env = "FLOW_OPD_GLOBAL_STRATEGY")]
    global_strategy: Option<String>,
    /// Where a node other than 0 writes its copy of the run (its checkpoints and stage outputs,
    /// which later stages and `--resume` read) [default: <runs>/node-<rank>].
    #[arg(long, env = "FLOW_OPD_SCRATCH")]
    scratch: Option<PathBuf>,
}

impl NodeArgs {
    fn settings(&self) -> Result<Option<flow_opd::train::distributed::NodeSettings>> {
        let flags = flow_opd::train::distributed::NodeFlags {
            nodes: self.nodes,
            rank: self.node_rank,
            coordinator: self.coordinator.clone(),
            host: self.node_host.clone(),
            port: self.node_port,
            timeout_s: self.node_timeout,
            strategy: self.global_strategy.clone(),
        };
        let settings = flags.settings().map_err(anyhow::Error::msg)?;
        if settings.is_none() && self.scratch.is_some() {
            anyhow::bail!("--scratch is given without --nodes N (N >= 2): only the nodes other than 0 write there");
        }
        Ok(settings)
    }
}

impl RecipeInputs {
    /// Loads the recipe at `path` with these inputs substituted.
    fn load(self, path: &Path) -> Result<flow_opd::recipe::Recipe> {
        let inputs: std::collections::BTreeMap<String, String> =
            [("model", self.model), ("teachers", self.teachers), ("prompts", self.prompts)]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string_lossy().into_owned())))
                .collect();
        let found = flow_opd::recipe::find_recipe(path, Path::new("recipes"))?;
        if found != path {
            eprintln!("recipe: {}", found.display());
        }
        Ok(flow_opd::recipe::Recipe::from_file_with(&found, &inputs)?)
    }
}

#[derive(Parser)]
#[command(name = "flow-opd", version, about = "Flow-OPD post-training for flow-matching text-to-image models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, run and convert MMDiT transformers.
    #[command(subcommand)]
    Model(ModelCommand),
    /// LoRA adapter files.
    #[command(subcommand)]
    Lora(LoraCommand),
    /// Run a TOML recipe (pretrain, teachers, merge_opd, ...): outputs go to runs/<name>/.
    Recipe {
        /// The recipe file.
        path: PathBuf,
        /// Where runs are written.
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        /// auto (cuda:0 in a cuda build that finds a GPU, else cpu), cpu, wgpu[:N] or cuda[:N]; a comma-separated list of one backend's devices trains
        /// the GRPO and OPD stages data-parallel, one peer per device (`cuda:0,cuda:1`; a device
        /// may repeat, e.g. `cpu,cpu`); the other stages run on the first.
        #[arg(long, default_value = "auto", value_delimiter = ',')]
        device: Vec<DeviceSpec>,
        /// Continue the run in runs/<name>/ after a crash, a kill or a spent time budget:
        /// finished stages are skipped once their outputs verify, an interrupted one continues
        /// from its last checkpoint (as `resume = true` in the recipe).
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        inputs: RecipeInputs,
        #[command(flatten)]
        nodes: NodeArgs,
    },
    /// burn-collective's global orchestrator for a multi-node group (node 0 of `flow-opd recipe
    /// --nodes N` starts it itself; this is that process).
    #[command(hide = true)]
    Orchestrator {
        /// The port to listen on (all interfaces).
        #[arg(long)]
        port: u16,
        /// End when standard input closes (the node that started it ended).
        #[arg(long)]
        exit_with_stdin: bool,
    },
    /// Text to image: one PNG per prompt (40-step ODE, CFG 4.5 by default; prompt i is seeded
    /// with seed + i).
    Sample {
        /// Pipeline folder (e.g. models/world_base, or a diffusers SD3 / SD3.5 folder).
        #[arg(long)]
        model: PathBuf,
        /// A prompt (repeat for several).
        #[arg(long)]
        prompt: Vec<String>,
        /// A file of prompts, one per line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// A LoRA adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 40)]
        steps: usize,
        #[arg(long, default_value_t = 4.5, allow_negative_numbers = true)]
        cfg: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The PNG (one prompt) or a folder (several prompts).
        #[arg(long)]
        out: PathBuf,
        /// Nearest-neighbour upscaling of the saved images.
        #[arg(long, default_value_t = 1)]
        scale: u32,
        /// SD3 folders: image height in pixels (default: the transformer's sample_size x the
        /// VAE factor).
        #[arg(long)]
        height: Option<usize>,
        /// SD3 folders: image width in pixels (default as the height).
        #[arg(long)]
        width: Option<usize>,
        /// SD3 folders: T5 prompt length (diffusers' max_sequence_length).
        #[arg(long, default_value_t = 256)]
        t5_length: usize,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
    },
    /// Draw a run's training curves (metrics.jsonl -> curves.png in the run folder).
    Plot {
        /// The run folder (e.g. runs/teachers).
        run: PathBuf,
    },
    /// Paired comparison of two rows of a results table evaluated on the same prompts and seeds:
    /// per metric and for Avg, the mean per-image difference A - B and its standard error. With
    /// `--against ROW`: the paper's Table 1, every row of the table against ROW.
    Compare {
        /// A results.json, or a run folder holding one.
        table: PathBuf,
        /// Row A (model name as in the table).
        #[arg(required_unless_present = "against")]
        a: Option<String>,
        /// Row B.
        #[arg(required_unless_present = "against")]
        b: Option<String>,
        /// Set every row against this one (the base) instead.
        #[arg(long, value_name = "ROW", conflicts_with_all = ["a", "b"])]
        against: Option<String>,
    },
    /// Paired comparison of two training stages of one run that drew the same prompts and noise
    /// (same seed, rollout settings and prompt sources; checked against the run's recipe.toml):
    /// both curves and their difference by thirds, and the mean difference A - B with its paired
    /// standard error. A stage with `lr = 0` is the starting model's own curve.
    CompareCurves {
        /// A run folder (or its metrics.jsonl, without the recipe check).
        run: PathBuf,
        /// Stage A (its output name, e.g. `teacher`).
        a: String,
        /// Stage B (e.g. `base`, an `lr = 0` stage).
        b: String,
        /// The metrics.jsonl field to compare (e.g. `train_composition`, `kl`).
        #[arg(long, default_value = "reward")]
        key: String,
    },
    /// How many samples per update a Flow-GRPO stage needs: the signal-to-noise ratio of its
    /// policy gradient at its starting policy, from independent gradient estimates (the stage's
    /// rollout, rewards and loss; nothing is trained or written).
    GradientSnr {
        /// The recipe file.
        recipe: PathBuf,
        /// The grpo stage (its `output` name, e.g. `teacher_geneval`).
        stage: String,
        /// Independent gradient estimates (at least 4), each of the stage's prompts x G samples.
        #[arg(long, default_value_t = 10)]
        estimates: usize,
        /// The stage's partition to sample (0-based; a mix such as GRPO-Mix has several).
        #[arg(long, default_value_t = 0)]
        partition: usize,
        /// Where the recipe's runs are (for a `model` or `init` that names an earlier stage).
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        /// auto (cuda:0 in a cuda build that finds a GPU, else cpu), cpu, wgpu[:N] or cuda[:N].
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        #[command(flatten)]
        inputs: RecipeInputs,
    },
    /// Print throughput figures: transformer forward and flow-matching training step.
    Bench {
        /// Preset or config.json.
        #[arg(long, default_value = "tiny")]
        config: String,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Latent side in latent pixels (16 for the world, 64 for SD3.5 at 512 px).
        #[arg(long, default_value_t = 16)]
        latent: usize,
        /// Text tokens.
        #[arg(long, default_value_t = 24)]
        tokens: usize,
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// Time Flow-OPD iterations instead (student SDE rollout with CFG, routed teacher and
        /// anchor labels, student forward/backward at every trained step, AdamW); `--batch`
        /// is then images per iteration.
        #[arg(long)]
        opd: bool,
        /// OPD: LoRA rank and alpha of the student and teachers.
        #[arg(long, default_value_t = 32)]
        rank: usize,
        #[arg(long, default_value_t = 64.0)]
        alpha: f64,
        /// OPD: task teachers the batch is routed over (plus the MAR anchor).
        #[arg(long, default_value_t = 3)]
        teachers: usize,
        /// OPD: SDE steps T.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// OPD: CFG scale.
        #[arg(long, default_value_t = 4.5, allow_negative_numbers = true)]
        cfg: f64,
        /// OPD: samples per transformer pass (gradients accumulated); the whole batch if absent.
        #[arg(long)]
        micro_batch: Option<usize>,
        /// Storage precision of the frozen base, f32, bf16 or f16 (adapters stay f32; the
        /// full-weight train step stays f32).
        #[arg(long, default_value = "f32")]
        weights: flow_opd::pipeline::WeightPrecision,
        /// What the train steps' backward recomputes: none, balanced (Burn's
        /// BalancedCheckpointing) or blocks (each transformer block keeps only its outputs).
        #[arg(long, default_value = "none")]
        checkpointing: flow_opd::train::Checkpointing,
        /// Skip the full-weight train step (its weights, gradients and AdamW moments are f32).
        #[arg(long)]
        skip_train: bool,
        /// Print one JSON object (the fields `tools/bench_torch.py` prints) instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
    },
    /// Evaluate a pipeline on the world's test prompts: a table (results.md + results.json),
    /// and PNG sample grids per task.
    Eval {
        /// Pipeline folder (e.g. models/world_base).
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Tasks: all, or a comma list of composition, text, preference, quality.
        #[arg(long, default_value = "all")]
        tasks: String,
        /// Test prompts per task (640 = all).
        #[arg(long, default_value_t = 640)]
        prompts: usize,
        /// The world's prompt set: `test` (the tables) or `train` (the RL training prompts).
        #[arg(long, default_value = "test")]
        split: String,
        /// ODE steps.
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// Classifier-free guidance scale.
        #[arg(long, default_value_t = 4.5, allow_negative_numbers = true)]
        cfg: f64,
        /// Row label (defaults to the model folder name).
        #[arg(long)]
        name: Option<String>,
        /// Output folder for results.md / results.json / grids (rows are added to an existing table).
        #[arg(long, default_value = "runs/eval")]
        out: PathBuf,
        /// auto (cuda:0 in a cuda build that finds a GPU, else cpu), cpu, wgpu[:N] or cuda[:N]; a comma-separated list of one backend's devices splits
        /// the prompts among them (the same images and table; `cpu,cpu` uses two CPU threads).
        #[arg(long, default_value = "auto", value_delimiter = ',')]
        device: Vec<DeviceSpec>,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A diffusers transformer folder (config.json + safetensors, single or sharded), a
    /// pipeline folder with transformer/, or a single .safetensors file (Stability layout).
    #[arg(long = "model", value_name = "PATH")]
    path: PathBuf,
    /// A config.json or a preset (sd3_medium, sd35_medium, tiny) overriding the model's own;
    /// Stability single files get a config inferred from their shapes otherwise.
    #[arg(long)]
    config: Option<String>,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print the config, the parameter count and the stored dtypes of a model.
    Info {
        /// Model folder or file.
        path: PathBuf,
        /// A config.json or preset overriding the model's own.
        #[arg(long)]
        config: Option<String>,
    },
    /// Run one transformer forward: IN holds hidden_states, encoder_hidden_states,
    /// pooled_projections and timestep (= 1000 sigma); OUT gets `sample`.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_name = "IN.safetensors")]
        inputs: PathBuf,
        #[arg(long, value_name = "OUT.safetensors")]
        output: PathBuf,
        /// A LoRA adapter (PEFT or diffusers folder, or .safetensors file) to apply.
        #[arg(long, value_name = "PATH")]
        adapter: Option<PathBuf>,
        /// auto (cuda:0 in a cuda build that finds a GPU, else cpu), cpu, wgpu[:N] or cuda[:N].
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
    },
    /// Save a model as a diffusers transformer folder (config.json + safetensors) that
    /// `SD3Transformer2DModel.from_pretrained` loads; converts Stability single files.
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// Output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Storage dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: SaveDtype,
        /// A LoRA adapter (PEFT or diffusers folder, or .safetensors file) folded into the
        /// weights (W + alpha/r B A) before saving.
        #[arg(long, value_name = "PATH")]
        adapter: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LoraCommand {
    /// Rewrite an adapter (PEFT or diffusers layout, from flow-opd or elsewhere) into the folder
    /// OUT: `peft` writes adapter_model.safetensors + adapter_config.json, `diffusers`
    /// pytorch_lora_weights.safetensors with its lora_adapter_metadata, `both` both (what
    /// flow-opd itself writes). Tensors are copied unchanged; OUT may be IN's folder.
    Convert {
        /// Adapter folder or .safetensors file.
        input: PathBuf,
        /// Output folder.
        output: PathBuf,
        /// peft, diffusers or both.
        #[arg(long, value_parser = ["peft", "diffusers", "both"])]
        to: String,
    },
}

fn resolve_config(config: &Option<String>) -> Result<Option<MmditConfig>> {
    let Some(config) = config else { return Ok(None) };
    let path = Path::new(config);
    if path.exists() {
        Ok(Some(MmditConfig::from_file(path)?))
    } else {
        Ok(Some(MmditConfig::preset(config).with_context(|| format!("`{config}` is neither a file nor a preset"))?))
    }
}

fn open(args: &ModelArgs) -> Result<ModelSource> {
    Ok(ModelSource::open(&args.path, resolve_config(&args.config)?)?)
}

struct ForwardTask {
    source: ModelSource,
    adapter: Option<PathBuf>,
    inputs: PathBuf,
    output: PathBuf,
}

impl BackendTask for ForwardTask {
    type Output = Result<Vec<usize>>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let model = self.source.load::<B>(&device)?;
        let adapter = match &self.adapter {
            Some(path) => Some(load_lora(path, &model, &device).map_err(|e| anyhow::anyhow!("--adapter: {e}"))?),
            None => None,
        };
        let adapters = match &adapter {
            Some(adapter) => ActiveAdapters::single(adapter),
            None => ActiveAdapters::none(),
        };
        Ok(forward_file(&model, &adapters, &self.inputs, &self.output, &device)?)
    }
}

struct ExportTask {
    source: ModelSource,
    adapter: Option<PathBuf>,
    out: PathBuf,
    dtype: SaveDtype,
}

impl BackendTask for ExportTask {
    type Output = Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let mut model = self.source.load::<B>(&device)?;
        if let Some(path) = &self.adapter {
            let adapter = load_lora(path, &model, &device).map_err(|e| anyhow::anyhow!("--adapter: {e}"))?;
            model = flow_opd::model::lora::fold_into(model, &adapter, 1.0);
        }
        Ok(save_diffusers(&model, &self.source.config, &self.out, self.dtype)?)
    }
}

/// Counts the parameters of the model the config describes (built lazily: nothing is allocated).
struct ManifestTask(MmditConfig);

impl BackendTask for ManifestTask {
    type Output = Vec<flow_opd::model::weights::ParamSpec>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        manifest::<B, _>(&self.0.init::<B>(&device))
    }
}

fn info(path: &Path, config: &Option<String>) -> Result<()> {
    let source = ModelSource::open(path, resolve_config(config)?)?;
    let specs = dispatch(first_compiled_device(), ManifestTask(source.config.clone()))?;
    source.check_against(&specs)?;
    let params: usize = specs.iter().map(|s| s.numel()).sum();
    let layout = match source.layout {
        Layout::Diffusers => "diffusers",
        Layout::Stability => "Stability single file",
    };
    println!("model:      {}", source.origin.display());
    println!("layout:     {layout} ({} file(s))", source.files.len());
    println!("parameters: {params} values in {} tensors", specs.len());
    for (dtype, count) in source.dtype_counts() {
        println!("dtype:      {dtype} ({count} values)");
    }
    println!("config:\n{}", serde_json::to_string_pretty(&source.config)?);
    Ok(())
}

/// Prints `report` as one JSON object with `fields` added (the `--json` output of `bench`).
fn print_json_with(report: &impl serde::Serialize, fields: serde_json::Value) -> Result<()> {
    let mut out = serde_json::to_value(report)?;
    if let (Some(out), serde_json::Value::Object(fields)) = (out.as_object_mut(), fields) {
        out.extend(fields);
    }
    println!("{out}");
    Ok(())
}

fn first_compiled_device() -> DeviceSpec {
    flow_opd::device::first_compiled()
}

struct BenchTask(flow_opd::bench::BenchConfig);

impl BackendTask for BenchTask {
    type Output = flow_opd::bench::BenchReport;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        flow_opd::bench::run_bench::<B>(&self.0, &device)
    }
}

struct OpdBenchTask(flow_opd::bench::OpdBenchConfig);

impl BackendTask for OpdBenchTask {
    type Output = Result<flow_opd::bench::OpdBenchReport, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
        match self.0.checkpointing {
            flow_opd::train::Checkpointing::None => flow_opd::bench::run_opd_bench::<burn::backend::Autodiff<B, NoCheckpointing>>(&self.0, &device),
            _ => flow_opd::bench::run_opd_bench::<burn::backend::Autodiff<B, BalancedCheckpointing>>(&self.0, &device),
        }
    }
}

struct SampleTask(flow_opd::pipeline::sample::SampleRequest, flow_opd::pipeline::sample::Sd3SampleOptions);

impl BackendTask for SampleTask {
    type Output = Result<Vec<PathBuf>>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let bar = flow_opd::recipe::progress_bar(self.0.prompts.len() as u64, "sample");
        let paths = flow_opd::pipeline::sample::run_sample_with::<B>(&self.0, &self.1, &device, |n| bar.inc(n as u64)).map_err(anyhow::Error::msg)?;
        bar.finish();
        Ok(paths)
    }
}

struct RecipeTask {
    recipe: flow_opd::recipe::Recipe,
    runs: PathBuf,
    /// A multi-node group to join, and the folder a node other than 0 writes its run into.
    nodes: Option<(flow_opd::train::distributed::NodeSettings, Option<PathBuf>)>,
}

impl MultiDeviceTask for RecipeTask {
    type Output = Result<()>;
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Self::Output {
        let node_count = self.nodes.as_ref().map_or(1, |(s, _)| s.nodes);
        self.recipe.check_devices(devices.len() * node_count).map_err(anyhow::Error::msg)?;
        // Node 0 writes the run; another node its own copy, in its scratch folder.
        let (runs, flag) = match &self.nodes {
            Some((s, scratch)) if s.rank > 0 => (scratch.clone().unwrap_or_else(|| self.runs.join(format!("node-{}", s.rank))), "--scratch"),
            _ => (self.runs.clone(), "--runs"),
        };
        flow_opd::pipeline::sample::check_output_location(flag, &runs.join(&self.recipe.name), true).map_err(anyhow::Error::msg)?;
        let interrupter = flow_opd::recipe::Interrupter::ctrl_c();
        if let Some((settings, _)) = self.nodes {
            let (nodes, rank) = (settings.nodes, settings.rank);
            let fingerprint = flow_opd::train::distributed::fingerprint(&self.recipe.resolved(), std::any::type_name::<B>());
            let group = flow_opd::train::parallel::join_nodes::<B>(settings, &devices, fingerprint).map_err(anyhow::Error::msg)?;
            tracing::info!("node {rank} of {nodes}: joined the group ({} devices in all)", group.world());
        }
        let ctx = flow_opd::recipe::run_recipe_with::<B>(&self.recipe, &runs, &devices, interrupter)?;
        println!("run written to {}", ctx.dir.display());
        Ok(())
    }
}

struct GradientSnrTask {
    recipe: flow_opd::recipe::Recipe,
    runs: PathBuf,
    stage: String,
    partition: usize,
    estimates: usize,
}

impl BackendTask for GradientSnrTask {
    type Output = Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let snr = flow_opd::recipe::grpo_gradient_snr::<B>(&self.recipe, &self.runs, &self.stage, self.partition, self.estimates, &device)
            .map_err(anyhow::Error::msg)?;
        println!("Flow-GRPO gradient of `{}` (partition {}) in {}:", self.stage, self.partition, self.recipe.name);
        // Each estimate is one update's worth of the stage's samples.
        print!("{}", snr.report(snr.samples_per_estimate));
        Ok(())
    }
}

fn parse_tasks(tasks: &str) -> Result<Vec<flow_opd::world::Task>> {
    if tasks == "all" {
        return Ok(flow_opd::eval::all_tasks());
    }
    tasks
        .split(',')
        .map(|t| {
            serde_json::from_value(serde_json::Value::String(t.trim().to_string()))
                .map_err(|_| anyhow::anyhow!("--tasks: unknown task `{t}` (expected composition, text, preference, quality or all)"))
        })
        .collect()
}

// Tensors are allocated and freed by the thousand a step; mimalloc reuses their memory where
// the system allocator returns large blocks to the OS and pays a page fault per fresh page.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`, v3): -1 never returns freed pages to
/// the OS, so the next step's tensors reuse them without page faults. A run's peak memory is
/// what it keeps; `MIMALLOC_PURGE_DELAY` in the environment still overrides it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() -> Result<()> {
    keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,burn_collective=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Model(ModelCommand::Info { path, config }) => info(&path, &config),
        Command::Bench { config, batch, latent, tokens, iterations, opd: true, rank, alpha, teachers, steps, cfg, micro_batch, weights, checkpointing, json, device, .. } => {
            for (flag, value) in [("--batch", batch), ("--latent", latent), ("--tokens", tokens), ("--iterations", iterations), ("--rank", rank), ("--teachers", teachers), ("--steps", steps)] {
                checks::at_least_one(flag, value).map_err(anyhow::Error::msg)?;
            }
            checks::guidance("--cfg", cfg).map_err(anyhow::Error::msg)?;
            checks::positive("--alpha", alpha).map_err(anyhow::Error::msg)?;
            micro_batch.map_or(Ok(()), |m| checks::at_least_one("--micro-batch", m)).map_err(anyhow::Error::msg)?;
            let model = resolve_config(&Some(config.clone()))?.expect("given");
            let bench = flow_opd::bench::OpdBenchConfig {
                model,
                batch,
                latent,
                tokens,
                rank,
                alpha,
                teachers,
                steps,
                guidance: cfg,
                iterations,
                micro_batch,
                weights,
                checkpointing,
            };
            let report = dispatch(device, OpdBenchTask(bench))?.map_err(anyhow::Error::msg)?;
            if json {
                print_json_with(&report, serde_json::json!({
                    "implementation": "flow-opd",
                    "config": config,
                    "device": device.to_string(),
                    "batch": batch, "latent": latent, "tokens": tokens, "steps": steps, "cfg": cfg,
                    "teachers": teachers, "rank": rank, "alpha": alpha, "micro_batch": micro_batch,
                    "weights": weights, "checkpointing": checkpointing.to_string(), "runs": iterations,
                    "images_per_s": report.images_per_s(batch),
                }))?;
                return Ok(());
            }
            println!("device:            {device}");
            println!("parameters:        {} (adapter {} per model, rank {rank})", report.parameters, report.adapter_parameters);
            println!(
                "batch x latent:    {batch} images x {latent}x{latent} (micro-batch {}), {tokens} text tokens, T {steps}, CFG {cfg}, {teachers} teachers + anchor, base weights {weights:?}",
                micro_batch.map_or("all".to_string(), |m| m.to_string())
            );
            println!("rollout:           {:.3} s ({:.2} images/s)", report.rollout_s, batch as f64 / report.rollout_s);
            println!("OPD update:        {:.3} s", report.update_s);
            println!("OPD iteration:     {:.3} s ({:.2} images/s)", report.rollout_s + report.update_s, report.images_per_s(batch));
            println!("loss:              {:.4e}", report.loss);
            if let Some(bytes) = report.reserved_bytes {
                println!("device memory:     {:.2} GiB reserved (high-water mark; checkpointing {checkpointing})", bytes as f64 / (1u64 << 30) as f64);
            }
            Ok(())
        }
        Command::Bench { config: name, batch, latent, tokens, iterations, rank, alpha, json, weights, checkpointing, skip_train, device, .. } => {
            for (flag, value) in [("--batch", batch), ("--latent", latent), ("--tokens", tokens), ("--iterations", iterations), ("--rank", rank)] {
                checks::at_least_one(flag, value).map_err(anyhow::Error::msg)?;
            }
            checks::positive("--alpha", alpha).map_err(anyhow::Error::msg)?;
            let model = resolve_config(&Some(name.clone()))?.expect("given");
            let bench = flow_opd::bench::BenchConfig { model, batch, latent, tokens, iterations, rank, alpha, weights, checkpointing, skip_train };
            let report = dispatch(device, BenchTask(bench))?;
            if json {
                print_json_with(&report, serde_json::json!({
                    "implementation": "flow-opd",
                    "config": name,
                    "device": device.to_string(),
                    "batch": batch,
                    "latent": latent,
                    "tokens": tokens,
                    // rayon's global pool, which flex runs on: RAYON_NUM_THREADS, else every core.
                    "threads": rayon::current_num_threads(),
                    "runs": iterations,
                    "weights": weights,
                    "checkpointing": checkpointing.to_string(),
                    "versions": { "flow-opd": env!("CARGO_PKG_VERSION"), "burn": "0.21.0" },
                }))?;
                return Ok(());
            }
            println!("device:            {device}");
            println!("parameters:        {}", report.parameters);
            println!("batch x latent:    {batch} x {latent}x{latent}, {tokens} text tokens");
            println!("forward:           {:.1} samples/s", report.forward_samples_per_s);
            println!("train step:        {:.1} samples/s (forward + backward + AdamW, all weights)", report.train_samples_per_s);
            println!("LoRA train step:   {:.1} samples/s (rank {rank}, attention projections)", report.lora_train_samples_per_s);
            if let Some(m) = &report.memory {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                println!(
                    "device memory:     forward {:.2} GiB, train {:.2} GiB, LoRA train {:.2} GiB reserved (checkpointing {checkpointing})",
                    gib(m.forward_reserved_bytes),
                    gib(m.train_reserved_bytes),
                    gib(m.lora_train_reserved_bytes)
                );
            }
            Ok(())
        }
        Command::Sample { model, prompt, prompts, adapter, steps, cfg, seed, out, scale, height, width, t5_length, device } => {
            checks::at_least_one("--steps", steps).map_err(anyhow::Error::msg)?;
            checks::guidance("--cfg", cfg).map_err(anyhow::Error::msg)?;
            checks::at_least_one("--scale", scale as usize).map_err(anyhow::Error::msg)?;
            checks::at_least_one("--t5-length", t5_length).map_err(anyhow::Error::msg)?;
            for (flag, side) in [("--height", height), ("--width", width)] {
                side.map_or(Ok(()), |side| checks::at_least_one(flag, side)).map_err(anyhow::Error::msg)?;
            }
            let mut all = prompt;
            if let Some(file) = prompts {
                all.extend(flow_opd::io::prompts::read_prompt_file(&file).map_err(|e| anyhow::anyhow!("--prompts: {e}"))?);
            }
            if all.iter().any(|p| p.trim().is_empty()) {
                anyhow::bail!("--prompt: an empty prompt (\"\"); give the text to draw");
            }
            flow_opd::pipeline::sample::check_output_location("--out", &out, all.len() > 1).map_err(anyhow::Error::msg)?;
            let sampling = flow_opd::pipeline::generate::GenerateConfig { steps, guidance: cfg, ..Default::default() };
            let request = flow_opd::pipeline::sample::SampleRequest { model, adapter, prompts: all, sampling, seed, out, scale };
            let sd3 = flow_opd::pipeline::sample::Sd3SampleOptions { height, width, t5_length };
            for path in dispatch(device, SampleTask(request, sd3))?? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Compare { table, a, b, against } => {
            let t = flow_opd::eval::ResultsTable::read_file(&table).map_err(anyhow::Error::msg)?;
            let row = |name: &str| t.row(name, &table).map_err(anyhow::Error::msg);
            let markdown = match (against, a, b) {
                (Some(base), ..) => flow_opd::eval::table::matrix_markdown(&t.rows.iter().collect::<Vec<_>>(), row(&base)?),
                (None, Some(a), Some(b)) => flow_opd::eval::table::comparison_markdown(row(&a)?, row(&b)?),
                _ => unreachable!("clap requires ROW_A and ROW_B without --against"),
            };
            print!("{}", markdown.map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Command::CompareCurves { run, a, b, key } => {
            let paired = flow_opd::eval::paired_curves::paired_curves(&run, &a, &b, &key).map_err(anyhow::Error::msg)?;
            print!("{}", paired.markdown());
            Ok(())
        }
        Command::GradientSnr { recipe, stage, estimates, partition, runs, device, inputs } => {
            flow_opd::train::grpo_snr::check_estimates(estimates).map_err(|e| anyhow::anyhow!("--estimates: {e}"))?;
            let recipe = inputs.load(&recipe)?;
            dispatch(device, GradientSnrTask { recipe, runs, stage, partition, estimates })?
        }
        Command::Plot { run } => {
            let path = flow_opd::eval::curves::write_curves(&run)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Recipe { path, runs, device, resume, inputs, nodes } => {
            let settings = nodes.settings()?;
            let mut recipe = inputs.load(&path)?;
            recipe.resume |= resume;
            let nodes = settings.map(|s| (s, nodes.scratch));
            dispatch_many(&device, RecipeTask { recipe, runs, nodes })?
        }
        Command::Orchestrator { port, exit_with_stdin } => flow_opd::train::distributed::run_orchestrator(port, exit_with_stdin).map_err(anyhow::Error::msg),
        Command::Eval { model, adapter, tasks, prompts, split, steps, cfg, name, out, device } => {
            checks::at_least_one("--steps", steps).map_err(anyhow::Error::msg)?;
            checks::guidance("--cfg", cfg).map_err(anyhow::Error::msg)?;
            checks::at_least_one("--prompts", prompts).map_err(anyhow::Error::msg)?;
            let tasks = parse_tasks(&tasks)?;
            flow_opd::pipeline::sample::check_output_location("--out", &out, true).map_err(anyhow::Error::msg)?;
            if !model.is_dir() {
                anyhow::bail!("--model {}: no such folder", model.display());
            }
            if let Some(adapter) = adapter.as_ref().filter(|a| !a.exists()) {
                anyhow::bail!("--adapter {}: no such file or folder", adapter.display());
            }
            let model_name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let stage = flow_opd::recipe::EvalStage {
                model: model.to_string_lossy().into_owned(),
                adapter: adapter.map(|a| a.to_string_lossy().into_owned()),
                row: Some(name.unwrap_or(model_name)),
                eval: flow_opd::eval::EvalConfig {
                    sampling: flow_opd::pipeline::generate::GenerateConfig { steps, guidance: cfg, ..Default::default() },
                    prompts_per_task: Some(prompts),
                    seed: 0,
                    tasks,
                    split: flow_opd::world::prompts::Split::ALL
                        .into_iter()
                        .find(|s| s.name() == split)
                        .ok_or_else(|| anyhow::anyhow!("--split: `{split}` is neither `test` nor `train`"))?,
                    ..Default::default()
                },
                export: None,
            };
            let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "eval".into());
            let runs = out.parent().map(Path::to_path_buf).unwrap_or_default();
            let recipe = flow_opd::recipe::Recipe { name, sd3: Default::default(), stages: vec![flow_opd::recipe::Stage::Eval(stage)], resume: false };
            dispatch_many(&device, RecipeTask { recipe, runs, nodes: None })?
        }
        Command::Model(ModelCommand::Forward { model, inputs, output, adapter, device }) => {
            let source = open(&model)?;
            let shape = dispatch(device, ForwardTask { source, adapter, inputs, output: output.clone() })??;
            println!("wrote sample {shape:?} to {}", output.display());
            Ok(())
        }
        Command::Model(ModelCommand::Export { model, out, dtype, adapter }) => {
            let source = open(&model)?;
            dispatch(first_compiled_device(), ExportTask { source, adapter, out: out.clone(), dtype })??;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Lora(LoraCommand::Convert { input, output, to }) => {
            use flow_opd::model::lora::LoraFormat;
            let formats = match to.as_str() {
                "peft" => vec![LoraFormat::Peft],
                "diffusers" => vec![LoraFormat::Diffusers],
                _ => vec![LoraFormat::Peft, LoraFormat::Diffusers],
            };
            flow_opd::model::lora::convert_lora(&input, &output, &formats)?;
            println!("wrote {}", output.display());
            Ok(())
        }
    }
}
