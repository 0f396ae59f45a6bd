//! Models: the [`Model`] trait the trainer drives, the seeded [`ParamStore`], and the
//! built-in model families.
//!
//! A model exposes its named parameters and a forward pass. The trainer calls
//! [`Model::loss_and_grad`], whose default runs candle's autograd; a built-in model may
//! override it with a hand-written kernel (the MLP does, on the CPU) as long as it produces
//! the same gradients.

pub mod act;
pub mod attention;
pub mod batchnorm;
pub mod bert;
pub mod conv;
pub mod conv_direct;
pub mod kernels;
pub mod layer_norm;
pub mod linear;
pub mod mlp;
pub mod packed_linear;
pub mod pool;
pub mod pretrained;
pub mod resnet;
mod resnet_train;
mod store;
pub mod vecmath;

pub use bert::{Bert, BertConfig, BertFreeze, BertOptions, Pooling};
pub use mlp::Mlp;
pub use resnet::{Freeze, ResNet, ResNetConfig};
pub use store::{read_safetensors, tensors_to_safetensors, Param, ParamStore};

use candle_core::{Device, Tensor};

use crate::config::{ModelConfig, ModelKind, Task};
use crate::data::{Batch, Schema};
use crate::dist::shared::SharedGrads;
use crate::rng::Rng;
use crate::{Error, Result};

/// The loss a task trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Softmax cross-entropy on logits against class indices (mean over the batch).
    CrossEntropy,
    /// Mean squared error against `[n, 1]` targets.
    Mse,
}

impl Loss {
    pub fn for_task(task: Task) -> Loss {
        match task {
            Task::Regression => Loss::Mse,
            _ => Loss::CrossEntropy,
        }
    }

    /// The loss of `out` against `y` as a candle scalar (differentiable).
    pub fn compute(&self, out: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Loss::CrossEntropy => candle_nn::loss::cross_entropy(out, y),
            Loss::Mse => candle_nn::loss::mse(out, y),
        }
    }
}

/// Softmax cross-entropy of `logits` (rows of `classes` values) against `labels`: returns the
/// mean loss and writes `scale ×` its gradient into `grad` (the native training steps' loss).
/// A label outside the classes is an error.
pub(crate) fn cross_entropy_grad(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    scale: f32,
    grad: &mut [f32],
) -> candle_core::Result<f64> {
    let n = labels.len();
    if logits.len() != n * classes || grad.len() != logits.len() {
        candle_core::bail!("cross-entropy: {n} labels for {} logits", logits.len());
    }
    let mut total = 0f64;
    let inv_n = scale / n as f32;
    for ((row, drow), &t) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let t = t as usize;
        if t >= classes {
            candle_core::bail!("cross-entropy: label {t} is not below the {classes} classes");
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (d, &v) in drow.iter_mut().zip(row) {
            *d = (v - max).exp();
            sum += *d;
        }
        let lse = max + sum.ln();
        total += (lse - row[t]) as f64;
        let inv = 1.0 / sum;
        for d in drow.iter_mut() {
            *d *= inv * inv_n;
        }
        drow[t] -= inv_n;
    }
    Ok(total / n.max(1) as f64)
}

/// Per-call context of a forward pass: train or eval mode, and the seeded dropout stream.
#[derive(Debug, Clone)]
pub struct ModelCtx {
    train: bool,
    rng: Rng,
    cached: bool,
    mask: Option<Tensor>,
}

impl ModelCtx {
    /// Training mode; dropout masks come from the keyed stream `(seed, "dropout", key)`, where
    /// the trainer uses the micro-batch's position as the key.
    pub fn train(seed: u64, key: u64) -> Self {
        Self {
            train: true,
            rng: Rng::keyed(seed, "dropout", key),
            cached: false,
            mask: None,
        }
    }

    /// Evaluation mode: dropout is the identity.
    pub fn eval() -> Self {
        Self {
            train: false,
            rng: Rng::new(0),
            cached: false,
            mask: None,
        }
    }

    /// Marks the input as cached features (see [`Model::cached_features`]): the model runs
    /// only the part after them.
    pub fn with_cached_features(mut self, cached: bool) -> Self {
        self.cached = cached;
        self
    }

    /// The batch's attention mask (`[n, L]`, 1 = token, 0 = padding) for token inputs.
    pub fn with_mask(mut self, mask: Option<Tensor>) -> Self {
        self.mask = mask;
        self
    }

    /// Sets the attention mask (see [`Self::with_mask`]).
    pub fn set_mask(&mut self, mask: Option<Tensor>) {
        self.mask = mask;
    }

    /// The attention mask of a token batch, if any.
    pub fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }

    /// Whether the input is cached features rather than raw samples.
    pub fn features_cached(&self) -> bool {
        self.cached
    }

    pub fn is_train(&self) -> bool {
        self.train
    }

    /// The context's random stream (for custom stochastic layers).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Inverted dropout with a seeded mask: in training, zeroes each element with probability
    /// `p` and scales the rest by `1 / (1 - p)`.
    pub fn dropout(&mut self, xs: &Tensor, p: f32) -> candle_core::Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(xs.clone());
        }
        let mask = self.dropout_mask(xs.elem_count(), p);
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }

    /// A dropout mask of `n` values, each `0` or `1 / (1 - p)`.
    pub fn dropout_mask(&mut self, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        (0..n)
            .map(|_| if self.rng.next_f32() < p { 0.0 } else { keep })
            .collect()
    }
}

/// Gradient buffers, one f32 buffer per trainable parameter, in the order of
/// [`ParamStore::trainable`]. This is the form the optimizer, clipping, accumulation and
/// data-parallel reduction work on.
///
/// The buffers lie end to end in one allocation. Under data-parallel training on one machine
/// that allocation is memory the other ranks can read ([`SharedGrads`]), so the gradient
/// all-reduce reads them where backward wrote them, with no copy.
pub struct Grads {
    pub names: Vec<String>,
    /// Where each parameter's values start in the allocation, and the total at the end.
    offsets: Vec<usize>,
    mem: GradMem,
}

enum GradMem {
    Heap(Vec<f32>),
    Shared(SharedGrads),
}

impl GradMem {
    /// The first `n` values (all of them).
    fn values_mut(&mut self, n: usize) -> &mut [f32] {
        match self {
            GradMem::Heap(v) => v,
            // SAFETY: this rank's current buffer of `n` values, which only this rank writes
            // and no other rank reads until the next all-reduce (see `SharedGrads`); `&mut
            // self` makes this the only reference in this process.
            GradMem::Shared(s) => unsafe { std::slice::from_raw_parts_mut(s.current(), n) },
        }
    }
}

impl Grads {
    /// Zeroed buffers for `params`.
    pub fn zeros(params: &[Param]) -> Self {
        Self::from_lens(
            params.iter().map(|p| p.name.clone()).collect(),
            params.iter().map(|p| p.var.elem_count()),
        )
    }

    /// Buffers named `names` holding `bufs` (one per name).
    pub fn from_vecs(names: Vec<String>, bufs: Vec<Vec<f32>>) -> Self {
        assert_eq!(names.len(), bufs.len(), "one gradient buffer per name");
        let mut g = Self::from_lens(names, bufs.iter().map(Vec::len));
        g.flat_mut().copy_from_slice(&bufs.concat());
        g
    }

    fn from_lens(names: Vec<String>, lens: impl Iterator<Item = usize>) -> Self {
        let mut offsets = vec![0];
        for n in lens {
            offsets.push(offsets.last().unwrap() + n);
        }
        let total = *offsets.last().unwrap();
        Self {
            names,
            offsets,
            mem: GradMem::Heap(vec![0.0; total]),
        }
    }

    /// Number of buffers (trainable parameters).
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every value, the buffers end to end.
    pub fn flat(&self) -> &[f32] {
        let n = self.offsets[self.offsets.len() - 1];
        match &self.mem {
            GradMem::Heap(v) => v,
            // SAFETY: this rank's current buffer of `n` values, which only this rank writes and
            // no other rank reads until the next all-reduce (see `SharedGrads`).
            GradMem::Shared(s) => unsafe { std::slice::from_raw_parts(s.current(), n) },
        }
    }

    /// Every value, the buffers end to end.
    pub fn flat_mut(&mut self) -> &mut [f32] {
        self.mem.values_mut(self.offsets[self.offsets.len() - 1])
    }

    /// The buffer of parameter `i`.
    pub fn buf(&self, i: usize) -> &[f32] {
        &self.flat()[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The buffer of parameter `i`.
    pub fn buf_mut(&mut self, i: usize) -> &mut [f32] {
        let (lo, hi) = (self.offsets[i], self.offsets[i + 1]);
        &mut self.flat_mut()[lo..hi]
    }

    /// The buffers, in parameter order.
    pub fn bufs(&self) -> impl ExactSizeIterator<Item = &[f32]> + '_ {
        let flat = self.flat();
        self.offsets.windows(2).map(move |w| &flat[w[0]..w[1]])
    }

    /// The buffers, in parameter order.
    pub fn bufs_mut(&mut self) -> Vec<&mut [f32]> {
        let Self { offsets, mem, .. } = self;
        let mut rest = mem.values_mut(offsets[offsets.len() - 1]);
        let mut out = Vec::with_capacity(offsets.len() - 1);
        for w in offsets.windows(2) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(w[1] - w[0]);
            out.push(head);
            rest = tail;
        }
        out
    }

    pub fn zero(&mut self) {
        use rayon::prelude::*;
        self.bufs_mut()
            .into_par_iter()
            .with_min_len(8)
            .for_each(|b| b.fill(0.0));
    }

    /// The buffer of parameter `name`.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(self.buf_mut(i))
    }

    /// Global L2 norm (accumulated in f64, in parameter order).
    pub fn norm(&self) -> f64 {
        self.flat()
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }

    pub fn scale(&mut self, s: f32) {
        self.flat_mut().iter_mut().for_each(|g| *g *= s);
    }

    pub fn is_finite(&self) -> bool {
        self.flat().iter().all(|g| g.is_finite())
    }

    /// Moves the values into `shared`, where the other ranks can read them; later all-reduces
    /// go through [`Grads::shared_mut`].
    pub(crate) fn place_in(&mut self, shared: SharedGrads) {
        assert_eq!(
            shared.len(),
            self.flat().len(),
            "shared gradient memory of the wrong size"
        );
        // SAFETY: the current buffer of `shared`, which no other rank reads before the first
        // all-reduce.
        unsafe { std::slice::from_raw_parts_mut(shared.current(), shared.len()) }
            .copy_from_slice(self.flat());
        self.mem = GradMem::Shared(shared);
    }

    /// The shared memory the buffers live in, when they were placed there.
    pub(crate) fn shared_mut(&mut self) -> Option<&mut SharedGrads> {
        match &mut self.mem {
            GradMem::Shared(s) => Some(s),
            GradMem::Heap(_) => None,
        }
    }
}

impl Clone for Grads {
    /// A copy of the values in memory of its own.
    fn clone(&self) -> Self {
        Self {
            names: self.names.clone(),
            offsets: self.offsets.clone(),
            mem: GradMem::Heap(self.flat().to_vec()),
        }
    }
}

impl std::fmt::Debug for Grads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grads")
            .field("names", &self.names)
            .field("values", &self.flat().len())
            .field("shared", &matches!(self.mem, GradMem::Shared(_)))
            .finish()
    }
}

/// A trainable model. Implement it to train a custom candle model with wick's trainer,
/// checkpointing, tuner and quantizer (see `examples/custom_model.rs`).
pub trait Model: Send {
    /// The model's parameters (build the model through [`ParamStore::var_builder`]).
    fn store(&self) -> &ParamStore;

    /// A short name of the architecture, recorded in `summary.json`.
    fn kind(&self) -> &str {
        "custom"
    }

    /// Forward pass: `[n, d]` features to `[n, outputs]` logits or predictions. Use
    /// [`ModelCtx::dropout`] for dropout so that runs stay reproducible.
    fn forward(&self, xs: &Tensor, ctx: &mut ModelCtx) -> candle_core::Result<Tensor>;

    /// Samples per forward pass in evaluation, prediction and feature caching (bounded by the
    /// trainer's own limits). Large models on long inputs use fewer to bound memory.
    fn eval_batch(&self) -> usize {
        1024
    }

    /// A model whose leading part is frozen and deterministic (e.g. a frozen backbone) returns
    /// the width of that part's output. The trainer then computes [`Model::features`] once per
    /// sample and trains on the cache, calling `forward` with a context whose
    /// [`ModelCtx::features_cached`] is set. Default: `None` (no caching).
    fn cached_features(&self) -> Option<usize> {
        None
    }

    /// The weights [`crate::quant::quantize`] may turn into int8, with their layer kind. A
    /// model that lists a layer must run it through the int8 path once the store holds int8
    /// weights for it (see [`crate::quant::linear_or`]). Default: none.
    fn quant_layers(&self) -> Vec<crate::quant::QuantLayer> {
        Vec::new()
    }

    /// The frozen part's output for raw inputs `xs` (evaluation mode, no gradient); `mask` is
    /// the attention mask of a token batch.
    fn features(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let _ = (xs, mask);
        candle_core::bail!("this model has no cacheable features")
    }

    /// Adds `scale ×` the gradient of the batch loss to `grads` and returns the loss.
    /// The default runs candle's autograd; override it only with an equivalent kernel.
    fn loss_and_grad(
        &self,
        batch: &Batch,
        loss: Loss,
        ctx: &mut ModelCtx,
        params: &[Param],
        grads: &mut Grads,
        scale: f32,
    ) -> Result<f64> {
        autograd_loss_and_grad(self, batch, loss, ctx, params, grads, scale)
    }
}

/// The default [`Model::loss_and_grad`]: forward, loss, candle backward, copy into `grads`.
pub fn autograd_loss_and_grad<M: Model + ?Sized>(
    model: &M,
    batch: &Batch,
    loss: Loss,
    ctx: &mut ModelCtx,
    params: &[Param],
    grads: &mut Grads,
    scale: f32,
) -> Result<f64> {
    ctx.set_mask(batch.mask.clone());
    let out = model.forward(&batch.x, ctx)?;
    let l = loss.compute(&out, &batch.y)?;
    let gs = l.backward()?;
    let add = |(p, buf): (&Param, &mut [f32])| -> Result<()> {
        let Some(g) = gs.get(p.var.as_tensor()) else {
            return Ok(());
        };
        let add = |g: &[f32]| {
            for (b, v) in buf.iter_mut().zip(g) {
                *b += scale * v;
            }
        };
        if kernels::with_f32(g, add).is_none() {
            let g: Vec<f32> = g
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            for (b, v) in buf.iter_mut().zip(g) {
                *b += scale * v;
            }
        }
        Ok(())
    };
    use rayon::prelude::*;
    params
        .par_iter()
        .zip(grads.bufs_mut().into_par_iter())
        .with_min_len(8)
        .try_for_each(add)?;
    Ok(l.to_scalar::<f32>()? as f64)
}

/// Builds the model named by `[model]` for a dataset with `schema`.
pub fn build(
    cfg: &ModelConfig,
    schema: &Schema,
    seed: u64,
    device: &Device,
) -> Result<Box<dyn Model>> {
    match cfg.kind {
        ModelKind::Mlp if schema.modality == "text" => Err(Error::Config(
            "the data is text (token ids); an MLP needs feature vectors: use model.kind = \"bert\" with model.pretrained = a Hugging Face model directory".into(),
        )),
        ModelKind::Mlp => {
            check_mlp_size(schema.input_dim, &cfg.hidden, schema.outputs())?;
            let store = ParamStore::with_device(seed, device.clone());
            let mlp = Mlp::new(
                store,
                schema.input_dim,
                &cfg.hidden,
                schema.outputs(),
                cfg.activation,
                cfg.dropout,
            )
            .map_err(Error::from)?;
            Ok(Box::new(mlp))
        }
        ModelKind::Resnet => Ok(Box::new(build_resnet(cfg, schema, seed, device)?)),
        ModelKind::Bert => Ok(Box::new(build_bert(cfg, schema, seed, device)?)),
    }
}

/// Bytes training keeps per parameter: the weight, its gradient and AdamW's two moments.
const TRAIN_BYTES_PER_PARAM: u128 = 16;

/// Refuses an MLP whose parameters alone would not fit this machine's memory in training
/// (the allocation would otherwise end the process with no message).
fn check_mlp_size(inputs: usize, hidden: &[usize], outputs: usize) -> Result<()> {
    let mut dims = vec![inputs];
    dims.extend_from_slice(hidden);
    dims.push(outputs);
    let params: u128 = dims
        .windows(2)
        .map(|w| (w[0] as u128 + 1) * w[1] as u128)
        .sum();
    let need = params * TRAIN_BYTES_PER_PARAM;
    let have = crate::alloc::total_memory_bytes().unwrap_or(u64::MAX) as u128;
    if need > have {
        return Err(Error::Config(format!(
            "model.hidden = {hidden:?} makes an MLP of {params} parameters ({inputs} inputs, {outputs} outputs), which needs about {:.1} GB to train (weights, gradients and optimizer state) but this machine has {:.1} GB; use narrower or fewer hidden layers",
            need as f64 / 1e9,
            have as f64 / 1e9
        )));
    }
    Ok(())
}

/// A BERT classifier for `schema`'s texts, from the pretrained encoder `model.pretrained`.
pub fn build_bert(cfg: &ModelConfig, schema: &Schema, seed: u64, device: &Device) -> Result<Bert> {
    if schema.modality != "text" {
        return Err(Error::Config(format!(
            "model.kind = \"bert\" reads text, but the data is {}; pack labelled text with `wick data pack text FILE.jsonl --out DIR`",
            schema.modality
        )));
    }
    if schema.task != Task::Classification {
        return Err(Error::Config(
            "model.kind = \"bert\" classifies; set data.task = \"classification\"".into(),
        ));
    }
    let num_classes = cfg.num_classes.unwrap_or(schema.outputs());
    if num_classes < schema.outputs() {
        return Err(Error::Config(format!(
            "model.num_classes = {num_classes}, but the data has {} classes; remove model.num_classes or raise it",
            schema.outputs()
        )));
    }
    let bert = load_bert(cfg, num_classes, seed, device)?;
    // A text schema's input width is the truncation length.
    if schema.input_dim > bert.config.max_position_embeddings {
        return Err(Error::Config(format!(
            "model.max_len = {} exceeds the model's {} positions; set model.max_len to at most {}",
            schema.input_dim,
            bert.config.max_position_embeddings,
            bert.config.max_position_embeddings
        )));
    }
    Ok(bert)
}

/// A BERT encoder from `model.pretrained` with a `num_classes`-way head (0: no head).
pub fn load_bert(
    cfg: &ModelConfig,
    num_classes: usize,
    seed: u64,
    device: &Device,
) -> Result<Bert> {
    let Some(spec) = cfg.pretrained.as_deref() else {
        return Err(Error::Config(
            "model.kind = \"bert\" needs model.pretrained = a Hugging Face model directory (config.json, tokenizer.json, model.safetensors) or hf:OWNER/NAME, e.g. \"checkpoints/pretrained/all-MiniLM-L6-v2\" (scripts/fetch-minilm.sh)".into(),
        ));
    };
    let files = bert::ModelFiles::locate(spec)?;
    let config = BertConfig::load(&files.config)?;
    let pooling = Pooling::parse(&cfg.pooling).ok_or_else(|| {
        Error::Config(format!(
            "model.pooling = {:?}: expected \"cls\" or \"mean\"",
            cfg.pooling
        ))
    })?;
    let freeze = BertFreeze::parse(&cfg.freeze).ok_or_else(|| {
        Error::Config(format!(
            "model.freeze = {:?}: a BERT takes \"none\", \"encoder\", \"embeddings\" or \"layers:N\"",
            cfg.freeze
        ))
    })?;
    let store = ParamStore::with_device(seed, device.clone());
    let weights = pretrained::read_weights(&files.weights, device)?;
    Bert::pretrained(
        store,
        config,
        BertOptions {
            num_classes,
            pooling,
            freeze,
            classifier_dropout: cfg.classifier_dropout,
        },
        &files.weights.display().to_string(),
        &weights,
    )
}

/// `[channels, height, width]` of a sample: `model.input_shape`, else the data's shape
/// (`[h, w]` is one channel); `None` for plain feature vectors.
pub fn sample_shape(cfg: &ModelConfig, schema: &Schema) -> Option<[usize; 3]> {
    match (cfg.input_shape.as_deref(), schema.input_shape.as_slice()) {
        (Some(&[c, h, w]), _) | (None, &[c, h, w]) => Some([c, h, w]),
        (None, &[h, w]) => Some([1, h, w]),
        _ => None,
    }
}

/// A ResNet for `schema`'s images, with pretrained backbone weights when configured.
pub fn build_resnet(
    cfg: &ModelConfig,
    schema: &Schema,
    seed: u64,
    device: &Device,
) -> Result<ResNet> {
    if schema.task != Task::Classification {
        return Err(Error::Config(
            "model.kind = \"resnet\" classifies; the data's label is a regression target (set data.task = \"classification\" for class labels)".into(),
        ));
    }
    let Some(shape) = sample_shape(cfg, schema) else {
        return Err(Error::Config(format!(
            "model.kind = \"resnet\" needs images, but each sample is a vector of {} features; set model.input_shape = [channels, height, width] (e.g. [1, 28, 28])",
            schema.input_dim
        )));
    };
    if shape.iter().product::<usize>() != schema.input_dim {
        return Err(Error::Config(format!(
            "model.input_shape = {shape:?} holds {} values but a sample has {}; fix model.input_shape",
            shape.iter().product::<usize>(),
            schema.input_dim
        )));
    }
    if shape[0] != 1 && shape[0] != 3 {
        return Err(Error::Config(format!(
            "model.input_shape = {shape:?}: a ResNet takes 1 (grayscale) or 3 (RGB) channels"
        )));
    }
    let weights = match &cfg.pretrained {
        Some(spec) => Some(pretrained::load(spec, device)?),
        None => None,
    };
    let stem_from_weights = weights.as_ref().and_then(|(_, w)| resnet::stem_channels(w));
    let in_channels = cfg.in_channels.or(stem_from_weights).unwrap_or(shape[0]);
    if shape[0] == 3 && in_channels == 1 {
        return Err(Error::Config(
            "model.in_channels = 1 but the images have 3 channels; use in_channels = 3".into(),
        ));
    }
    let width = weights
        .as_ref()
        .and_then(|(_, w)| resnet::stem_width(w))
        .unwrap_or(cfg.width);
    let freeze = Freeze::parse(&cfg.freeze).ok_or_else(|| {
        Error::Config(format!(
            "model.freeze = {:?}: expected \"none\", \"backbone\" or \"until:layerN\"",
            cfg.freeze
        ))
    })?;
    let store = ParamStore::with_device(seed, device.clone());
    let net = ResNet::new(
        store.clone(),
        ResNetConfig {
            arch: cfg.arch,
            width,
            num_classes: cfg.num_classes.unwrap_or(schema.outputs()),
            in_channels,
            input_shape: shape,
            head_hidden: cfg.head_hidden,
            dropout: cfg.dropout,
            freeze,
            stages: cfg.stages,
        },
    )?;
    if let Some((origin, w)) = weights {
        let stages = cfg.stages;
        store.load_map(&origin, &w, &|n| resnet::unused_name(n, stages))?;
    }
    Ok(net)
}
