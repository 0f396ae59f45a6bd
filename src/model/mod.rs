//! Models: the [`Model`] trait the trainer drives, the seeded [`ParamStore`], and the
//! built-in model families.
//!
//! A model exposes its named parameters and a forward pass. The trainer calls
//! [`Model::loss_and_grad`], whose default runs candle's autograd; a built-in model may
//! override it with a hand-written kernel (the MLP does, on the CPU) as long as it produces
//! the same gradients.

pub mod kernels;
pub mod mlp;
mod store;

pub use mlp::Mlp;
pub use store::{read_safetensors, tensors_to_safetensors, Param, ParamStore};

use candle_core::{Device, Tensor};

use crate::config::{ModelConfig, ModelKind, Task};
use crate::data::{Batch, Schema};
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

/// Per-call context of a forward pass: train or eval mode, and the seeded dropout stream.
#[derive(Debug, Clone)]
pub struct ModelCtx {
    train: bool,
    rng: Rng,
}

impl ModelCtx {
    /// Training mode; dropout masks come from the keyed stream `(seed, "dropout", key)`, where
    /// the trainer uses the micro-batch's position as the key.
    pub fn train(seed: u64, key: u64) -> Self {
        Self {
            train: true,
            rng: Rng::keyed(seed, "dropout", key),
        }
    }

    /// Evaluation mode: dropout is the identity.
    pub fn eval() -> Self {
        Self {
            train: false,
            rng: Rng::new(0),
        }
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

/// Gradient buffers, one flat f32 vector per trainable parameter, in the order of
/// [`ParamStore::trainable`]. This is the form the optimizer, clipping, accumulation and
/// data-parallel reduction work on.
#[derive(Debug, Clone)]
pub struct Grads {
    pub names: Vec<String>,
    pub bufs: Vec<Vec<f32>>,
}

impl Grads {
    /// Zeroed buffers for `params`.
    pub fn zeros(params: &[Param]) -> Self {
        Self {
            names: params.iter().map(|p| p.name.clone()).collect(),
            bufs: params
                .iter()
                .map(|p| vec![0.0; p.var.elem_count()])
                .collect(),
        }
    }

    pub fn zero(&mut self) {
        self.bufs.iter_mut().for_each(|b| b.fill(0.0));
    }

    /// The buffer of parameter `name`.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&mut self.bufs[i])
    }

    /// Global L2 norm (accumulated in f64, in parameter order).
    pub fn norm(&self) -> f64 {
        self.bufs
            .iter()
            .flat_map(|b| b.iter())
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }

    pub fn scale(&mut self, s: f32) {
        self.bufs.iter_mut().flatten().for_each(|g| *g *= s);
    }

    pub fn is_finite(&self) -> bool {
        self.bufs.iter().flatten().all(|g| g.is_finite())
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
    let out = model.forward(&batch.x, ctx)?;
    let l = loss.compute(&out, &batch.y)?;
    let gs = l.backward()?;
    for (p, buf) in params.iter().zip(grads.bufs.iter_mut()) {
        if let Some(g) = gs.get(p.var.as_tensor()) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            for (b, v) in buf.iter_mut().zip(g) {
                *b += scale * v;
            }
        }
    }
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
            "the data is text (token ids); an MLP needs feature vectors: use a text model (model.kind = \"bert\", coming with BERT support)".into(),
        )),
        ModelKind::Mlp => {
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
    }
}
