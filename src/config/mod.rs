//! The TOML run configuration.
//!
//! A run file has the sections `[run]`, `[data]`, `[model]`, `[optim]`, `[schedule]` and
//! `[train]`. Every key has a documented default (see `docs/CONFIG.md`) except `data.path`.
//! [`load`] parses a file, applies `--set key=value` overrides and validates the result; errors
//! name the file, line and key, and suggest the closest valid key.

mod load;
mod validate;

pub(crate) use load::closest as closest_name;
pub use load::{load, load_str, parse_override, validate};
pub use validate::monitor_names;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A complete, resolved run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub dist: DistConfig,
    /// `wick tune` only: the study. Trials run with this section removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<TuneConfig>,
}

/// Samplers for `wick tune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    Tpe,
    Random,
    Grid,
}

/// Pruners for `wick tune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrunerKind {
    None,
    Median,
    Asha,
}

/// `[tune.tpe]`: the TPE sampler's settings, as Optuna's `TPESampler` arguments. The defaults
/// are wick's (`TpeSampler::new()`); Optuna's are `n_ei_candidates = 24`, `gamma = 0.1`,
/// `ei_weights = false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TpeConfig {
    /// Trials sampled uniformly before TPE takes over.
    pub n_startup_trials: usize,
    /// Points drawn from the good trials' mixture; the best by l(x)/g(x) is proposed.
    pub n_ei_candidates: usize,
    /// The share of finished trials in the good group (at most 25 trials).
    pub gamma: f64,
    /// Joint kernels over the parameters (Optuna 5's default) instead of one per parameter.
    pub multivariate: bool,
    /// Good trials weigh their improvement on the rest (wick's default); `false` gives
    /// Optuna's weights.
    pub ei_weights: bool,
}

impl Default for TpeConfig {
    fn default() -> Self {
        let s = crate::tune::TpeSampler::new();
        Self {
            n_startup_trials: s.n_startup_trials,
            n_ei_candidates: s.n_ei_candidates,
            gamma: s.gamma,
            multivariate: s.multivariate,
            ei_weights: s.ei_weights,
        }
    }
}

/// One searched parameter: exactly one of `float`, `int` or `choices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub float: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int: Option<[i64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<toml::Value>>,
    #[serde(default)]
    pub log: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<f64>,
}

/// `[tune]`: a hyper-parameter study over this config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuneConfig {
    pub n_trials: usize,
    /// `"maximize"` or `"minimize"`; default from the metric (losses are minimized).
    pub direction: Option<crate::tune::Direction>,
    /// A metric the trainer reports, e.g. `eval_accuracy`; default `train.monitor`'s.
    pub metric: Option<String>,
    pub seed: u64,
    pub sampler: SamplerKind,
    /// `[tune.tpe]`: settings of the `"tpe"` sampler.
    pub tpe: TpeConfig,
    pub pruner: PrunerKind,
    /// Trial processes running at once.
    pub workers: usize,
    /// The study journal; default `checkpoints/tune/<run.name>/journal.jsonl`.
    pub storage: Option<PathBuf>,
    /// Config paths to search, e.g. `"optim.lr" = { float = [1e-4, 1e-1], log = true }`.
    pub space: std::collections::BTreeMap<String, SpaceSpec>,
}

impl Default for TuneConfig {
    fn default() -> Self {
        Self {
            n_trials: 20,
            direction: None,
            metric: None,
            seed: 0,
            sampler: SamplerKind::Tpe,
            tpe: TpeConfig::default(),
            pruner: PrunerKind::None,
            workers: 1,
            storage: None,
            space: Default::default(),
        }
    }
}

/// `[run]`: identity and environment of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Name used for the run directory `<output_dir>/<name>-<timestamp>`.
    pub name: String,
    /// The one seed that drives init, shuffling and dropout.
    pub seed: u64,
    /// `"cpu"`, `"cuda"` (GPU 0, or under mpirun the rank's GPU) or `"cuda:N"` (feature `cuda`).
    pub device: String,
    /// Where run directories are created.
    pub output_dir: PathBuf,
    /// Compute threads; 0 uses every core.
    pub threads: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            seed: 42,
            device: "cpu".into(),
            output_dir: PathBuf::from("checkpoints/runs"),
            threads: 0,
        }
    }
}

/// A parsed `run.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA GPU by ordinal (`"cuda"` is `cuda:0`).
    Cuda(usize),
}

/// `"cpu"`, `"cuda"` or `"cuda:N"`; `None` for anything else.
pub fn parse_device(s: &str) -> Option<DeviceSpec> {
    match s {
        "cpu" => Some(DeviceSpec::Cpu),
        "cuda" => Some(DeviceSpec::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda),
    }
}

impl RunConfig {
    /// The candle device of `run.device`. A data-parallel rank on `"cuda"` takes GPU
    /// `local rank % visible GPUs`, so that `mpirun -np N` on an N-GPU machine uses them all.
    pub fn candle_device(&self) -> crate::Result<candle_core::Device> {
        match parse_device(&self.device) {
            Some(DeviceSpec::Cpu) => Ok(candle_core::Device::Cpu),
            Some(DeviceSpec::Cuda(n)) => cuda_device(n, self.device == "cuda"),
            None => Err(crate::Error::Config(format!(
                "run.device = {:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"",
                self.device
            ))),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(n: usize, by_rank: bool) -> crate::Result<candle_core::Device> {
    let n = match (by_rank, crate::dist::launched_world()) {
        (true, Some((rank, _, _))) => crate::dist::rank_gpu(rank)?,
        _ => n,
    };
    candle_core::Device::new_cuda(n).map_err(|e| {
        crate::Error::Config(format!(
            "run.device = \"cuda:{n}\": {e}; check `nvidia-smi`, or set run.device = \"cpu\""
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(n: usize, _by_rank: bool) -> crate::Result<candle_core::Device> {
    Err(crate::Error::Config(format!(
        "run.device = \"cuda:{n}\": this wick was built without CUDA; rebuild with `--features cuda`"
    )))
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Classification when the label column holds text or few distinct integers.
    Auto,
    Classification,
    Regression,
}

/// How the training set is shuffled each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shuffle {
    Global,
    Block,
}

/// `[data]`: where the examples come from and how they are split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A CSV file with a header row, or a shard directory made by `wick data pack`. Relative
    /// paths are resolved against the working directory, then against the config file's
    /// directory.
    pub path: PathBuf,
    /// Name of the label column (CSV; default `target`) or field (shards; default the
    /// manifest's label field).
    pub label: Option<String>,
    /// Shards: the field fed to the model (default: the first fixed-shape field that is not
    /// the label).
    pub input: Option<String>,
    /// Optional held-out file or shard directory; when absent, `test_fraction` of `path` is
    /// held out.
    pub test_path: Option<PathBuf>,
    /// Fraction held out for evaluation (seeded split) when there is no `test_path`.
    pub test_fraction: f64,
    pub task: Task,
    /// Columns to ignore (neither feature nor label).
    pub drop: Vec<String>,
    /// Standardize features with the training split's mean and standard deviation (CSV) or
    /// the statistics recorded when packing (shards).
    pub standardize: bool,
    /// Shards: check every shard's checksum when opening the dataset.
    pub verify_checksums: bool,
    /// `"global"`: a full permutation per epoch. `"block"`: shuffle shard order, then samples
    /// within windows of `shuffle_window` shards (for datasets far larger than memory).
    pub shuffle: Shuffle,
    pub shuffle_window: usize,
    /// Shards of text: the `tokenizer.json` that tokenizes it at load time.
    pub tokenizer: Option<PathBuf>,
    /// Text: truncate to this many tokens (batches are padded to their longest sequence).
    pub max_len: usize,
    /// Shards of encoded images: the decode/resize/crop/flip/normalize pipeline.
    pub image: crate::data::image::ImageConfig,
    /// Image-shaped samples: move each training sample by up to this many pixels in each
    /// direction, zero-filled (torchvision's `RandomCrop(size, padding=N)`); 0 = off.
    pub random_shift: usize,
}

impl DataConfig {
    /// The CSV label column.
    pub fn csv_label(&self) -> &str {
        self.label.as_deref().unwrap_or("target")
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            label: None,
            input: None,
            test_path: None,
            test_fraction: 0.2,
            task: Task::Auto,
            drop: Vec::new(),
            standardize: true,
            verify_checksums: true,
            shuffle: Shuffle::Global,
            shuffle_window: 4,
            tokenizer: None,
            max_len: 128,
            image: Default::default(),
            random_shift: 0,
        }
    }
}

/// The built-in model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mlp,
    Resnet,
    Bert,
}

/// ResNet depths (torchvision's layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResnetArch {
    Resnet18,
    Resnet34,
    Resnet50,
}

/// Activation functions for the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    Sigmoid,
    Gelu,
}

/// `[model]`: the architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// MLP: hidden layer widths, e.g. `[256, 256]`.
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// MLP: dropout probability after each hidden activation. ResNet: dropout before the head.
    pub dropout: f32,
    /// ResNet: depth.
    pub arch: ResnetArch,
    /// ResNet: channels of the first stage (torchvision: 64). Narrower networks train faster.
    pub width: usize,
    /// ResNet: outputs of the new head. Default: the number of classes in the data.
    pub num_classes: Option<usize>,
    /// ResNet: a hidden layer in the head (`fc.0` → ReLU → dropout → `fc.3`), or none (`fc`).
    pub head_hidden: Option<usize>,
    /// ResNet: pretrained weights: a safetensors or torchvision `.pth` file, a wick run
    /// directory, or `hf:REPO` (Hugging Face Hub, cached). The head is always new.
    pub pretrained: Option<String>,
    /// ResNet: `"none"`, `"backbone"` (everything but the head) or `"until:layerN"`
    /// (the stem and stages 1..N).
    pub freeze: String,
    /// ResNet: channels of the stem. Default: those of the pretrained `conv1.weight`, else those
    /// of the data. Grayscale input to a 3-channel stem is replicated.
    pub in_channels: Option<usize>,
    /// Shape `[channels, height, width]` of each sample when the data is a flat feature vector
    /// (e.g. `[1, 28, 28]` for MNIST pixels in a CSV). Image shards know their shape.
    pub input_shape: Option<Vec<usize>>,
    /// ResNet: how many of the four stages to keep (the head reads the last one kept).
    pub stages: usize,
    /// BERT: `"cls"` (the pooler over `[CLS]`) or `"mean"` (masked mean of the tokens).
    pub pooling: String,
    /// BERT: truncation length in tokens (overrides `data.max_len`).
    pub max_len: Option<usize>,
    /// BERT: dropout before the classifier.
    pub classifier_dropout: f32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            hidden: vec![128],
            activation: Activation::Relu,
            dropout: 0.0,
            arch: ResnetArch::Resnet18,
            width: 64,
            num_classes: None,
            head_hidden: None,
            pretrained: None,
            freeze: "none".into(),
            in_channels: None,
            input_shape: None,
            stages: 4,
            pooling: "cls".into(),
            max_len: None,
            classifier_dropout: 0.1,
        }
    }
}

/// Optimizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    Sgd,
    Adamw,
}

/// `[optim]`: optimizer and its hyper-parameters (PyTorch semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f64,
    /// Decoupled for AdamW, L2 (added to the gradient) for SGD. Default: 0.01 for AdamW, 0 for SGD.
    pub weight_decay: Option<f64>,
    pub betas: [f64; 2],
    pub eps: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    /// Parameters whose name contains one of these strings get no weight decay
    /// (e.g. `["bias", "norm"]`, as the HF Trainer does).
    pub no_decay: Vec<String>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimKind::Adamw,
            lr: 1e-3,
            weight_decay: None,
            betas: [0.9, 0.999],
            eps: 1e-8,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            no_decay: Vec::new(),
        }
    }
}

impl OptimConfig {
    /// The weight decay in force, after the per-optimizer default.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimKind::Adamw => 0.01,
            OptimKind::Sgd => 0.0,
        })
    }
}

/// Learning-rate schedules applied after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    /// Multiply by `gamma` every `step_size` epochs.
    Step,
    /// Cosine decay to `min_lr` at the last step.
    Cosine,
    /// Linear decay to `min_lr` at the last step (the HF Trainer default).
    Linear,
}

/// `[schedule]`: the learning-rate schedule, evaluated at every optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Linear warm-up from 0 over this many optimizer steps.
    pub warmup_steps: usize,
    /// Warm-up as a fraction of all optimizer steps (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// `step`: epochs between decays.
    pub step_size: usize,
    /// `step`: decay factor.
    pub gamma: f64,
    /// `cosine`/`linear`: final learning rate.
    pub min_lr: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            step_size: 10,
            gamma: 0.1,
            min_lr: 0.0,
        }
    }
}

/// `[train.early_stopping]`: stop when the monitored metric stops improving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStoppingConfig {
    /// Evaluations without improvement before stopping.
    pub patience: usize,
    /// Smallest change that counts as an improvement.
    pub min_delta: f64,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        Self {
            patience: 5,
            min_delta: 0.0,
        }
    }
}

/// Which engine carries data-parallel training (see [`crate::dist`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// MPI when the process was started by `mpirun` (or `wick launch`), else local.
    Auto,
    /// One process, no communication.
    Local,
    /// MPI (cargo feature `mpi`): CPU ranks on one or many machines.
    Mpi,
    /// NCCL (cargo feature `nccl`): one GPU per rank.
    Nccl,
}

/// `[dist]`: data-parallel training. `train.batch_size` is per rank, so N ranks train on
/// batches of N × `batch_size`, as PyTorch's DDP does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    pub backend: DistBackend,
    /// Seconds a rank waits for the others at a collective before it stops with an error
    /// naming the ranks that did not arrive.
    pub timeout_s: f64,
    /// Gradients are all-reduced in buckets of about this many megabytes (PyTorch: 25).
    pub bucket_mb: f64,
    /// NCCL outside `mpirun`: the file through which rank 0 hands the NCCL id to the other
    /// ranks (started with `WICK_RANK` / `WICK_WORLD_SIZE`). Every rank must see it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rendezvous: Option<PathBuf>,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: DistBackend::Auto,
            timeout_s: 300.0,
            bucket_mb: 25.0,
            rendezvous: None,
        }
    }
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before one optimizer step.
    pub accumulate: usize,
    /// Global-norm gradient clipping; 0 turns it off.
    pub clip_norm: f64,
    /// Evaluate every N epochs (the last epoch is always evaluated).
    pub eval_every: usize,
    /// Metric that selects the `best` checkpoint and drives early stopping, e.g.
    /// `eval_accuracy`, `eval_loss`, `eval_f1`, `eval_mse`. Default: `eval_accuracy` for
    /// classification, `eval_loss` for regression.
    pub monitor: Option<String>,
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Also save `last` every N optimizer steps (0: only at the end of epochs).
    pub checkpoint_every: usize,
    /// Save `last` at the end of every N epochs (and always after the last epoch and when
    /// stopping early), as Lightning's `every_n_epochs`.
    pub save_every: usize,
    /// Drop the last incomplete batch of each epoch.
    pub drop_last: bool,
    /// Log a progress line every N optimizer steps when stderr is not a terminal.
    pub log_every: usize,
    /// With a frozen backbone and no random augmentation, compute the backbone's features
    /// once per sample and train the head on that cache.
    pub cache_features: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            accumulate: 1,
            clip_norm: 0.0,
            eval_every: 1,
            monitor: None,
            early_stopping: None,
            checkpoint_every: 0,
            save_every: 1,
            drop_last: false,
            log_every: 50,
            cache_features: true,
        }
    }
}

impl Config {
    /// The resolved config as TOML, with every default written out.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Config always serializes")
    }

    /// A short content hash of the resolved config (first 12 hex digits of its SHA-256).
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.to_toml().as_bytes());
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}
