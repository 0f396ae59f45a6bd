//! Post-training int8 quantization.
//!
//! Scheme:
//! - weights: symmetric int8 per output channel (`w ≈ q · scale[out]`, `q ∈ [-127, 127]`);
//! - activations of linear and convolution layers: int8 per row (per token, per output
//!   pixel), quantized at run time by the row's own range (`dynamic`), or with one range per
//!   layer calibrated on training batches (`static`);
//! - products in i32 through the [`gemm`] kernels, then an f32 epilogue (scales, bias,
//!   BatchNorm, activation);
//! - embedding tables: int8 rows with a scale per row, dequantized when looked up.
//!
//! A model lists what can be quantized through [`crate::model::Model::quant_layers`];
//! [`quantize`] quantizes those weights in the model's [`ParamStore`](crate::model::ParamStore), after which the same
//! model (the same [`crate::model::Model`] implementation) runs its int8 path. A layer the user
//! skips, or whose int8 output differs from its f32 output by more than
//! [`QuantConfig::max_error`] on calibration data (the sensitivity check), stays in f32.

pub mod amx;
mod file;
pub mod gemm;
mod ops;

pub use file::{file_shapes, load, save, QuantMeta, MODEL_FILE, REPORT_FILE};
pub use gemm::Act;
pub use ops::{
    conv2d, embedding, linear, linear_act, linear_fused, linear_or, linear_with, mlp, mlp_with,
    set_fused, After,
};

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::data::{BatchPlan, Source};
use crate::model::conv::ConvSpec;
use crate::model::{Model, ModelCtx};
use crate::{Error, Result};

/// What kind of layer a weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// `[out, in]`, used as `x·Wᵀ`.
    Linear,
    /// `[out, in, kh, kw]` (PyTorch layout) on NHWC activations.
    Conv2d,
    /// `[rows, dim]`, looked up by index.
    Embedding,
}

/// A quantizable weight of a model.
#[derive(Debug, Clone)]
pub struct QuantLayer {
    /// The weight's parameter name, e.g. `encoder.layer.0.intermediate.dense.weight`.
    pub name: String,
    pub kind: LayerKind,
    /// Stride and padding of a convolution (for its sensitivity check).
    pub conv: Option<ConvSpec>,
}

impl QuantLayer {
    pub fn linear(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: LayerKind::Linear,
            conv: None,
        }
    }

    pub fn embedding(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: LayerKind::Embedding,
            conv: None,
        }
    }

    pub fn conv2d(name: impl Into<String>, spec: ConvSpec) -> Self {
        Self {
            name: name.into(),
            kind: LayerKind::Conv2d,
            conv: Some(spec),
        }
    }
}

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// Each row by its own range, at run time.
    Dynamic,
    /// One range per layer, calibrated on training batches.
    Static,
}

impl QuantMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMode::Dynamic => "dynamic",
            QuantMode::Static => "static",
        }
    }
}

/// Options of [`quantize`].
#[derive(Debug, Clone)]
pub struct QuantConfig {
    pub mode: QuantMode,
    /// Calibration batches (activation ranges in static mode; the sensitivity check in both).
    pub calib_batches: usize,
    /// Rows per calibration batch.
    pub calib_batch_size: usize,
    /// Layers kept in f32: a pattern matches a weight name exactly, as a prefix ending in `.`,
    /// or with `*` wildcards (`*.pooler.*`).
    pub skip: Vec<String>,
    /// The sensitivity check: a layer whose int8 output differs from its f32 output by more
    /// than this relative L2 error on calibration inputs stays in f32.
    pub max_error: f32,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            mode: QuantMode::Dynamic,
            calib_batches: 4,
            calib_batch_size: 32,
            skip: Vec::new(),
            max_error: 0.05,
        }
    }
}

/// An int8 weight: values per output channel (row of the first dimension) and their scales.
#[derive(Debug)]
pub struct QTensor {
    pub name: String,
    pub kind: LayerKind,
    /// The f32 weight's shape.
    pub shape: Vec<usize>,
    pub q: Vec<i8>,
    /// One scale per row of `shape[0]`.
    pub scale: Vec<f32>,
    /// Static mode: the activation scale of the layer's input.
    pub act_scale: Option<f32>,
    packed: OnceLock<gemm::Packed>,
}

impl QTensor {
    /// Quantizes `w` (shape `shape`) per row of its first dimension.
    pub fn quantize(name: &str, kind: LayerKind, w: &[f32], shape: &[usize]) -> Self {
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let cols = w.len() / rows;
        let mut q = vec![0i8; w.len()];
        let mut scale = vec![0f32; rows];
        for ((src, dst), s) in w
            .chunks_exact(cols.max(1))
            .zip(q.chunks_exact_mut(cols.max(1)))
            .zip(scale.iter_mut())
        {
            let max = src.iter().fold(0f32, |a, v| a.max(v.abs()));
            *s = max / 127.0;
            if max > 0.0 {
                let inv = 127.0 / max;
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Self::from_parts(name, kind, shape.to_vec(), q, scale, None)
    }

    pub fn from_parts(
        name: &str,
        kind: LayerKind,
        shape: Vec<usize>,
        q: Vec<i8>,
        scale: Vec<f32>,
        act_scale: Option<f32>,
    ) -> Self {
        Self {
            name: name.to_string(),
            kind,
            shape,
            q,
            scale,
            act_scale,
            packed: OnceLock::new(),
        }
    }

    /// Output channels (rows).
    pub fn rows(&self) -> usize {
        self.scale.len()
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.q.len() / self.rows().max(1)
    }

    /// The f32 values `q · scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        let c = self.cols().max(1);
        self.q
            .chunks_exact(c)
            .zip(&self.scale)
            .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 * s))
            .collect()
    }

    /// The weights packed for the GEMM (convolutions in `(kh, kw, in)` column order), packed
    /// on first use.
    pub fn packed(&self) -> &gemm::Packed {
        self.packed.get_or_init(|| {
            let (n, k) = (self.rows(), self.cols());
            match (self.kind, self.shape.as_slice()) {
                (LayerKind::Conv2d, &[o, i, kh, kw]) => {
                    let mut p = vec![0i8; self.q.len()];
                    for oc in 0..o {
                        for c in 0..i {
                            for kk in 0..kh * kw {
                                p[oc * k + kk * i + c] = self.q[oc * k + c * kh * kw + kk];
                            }
                        }
                    }
                    gemm::pack(&p, n, k)
                }
                _ => gemm::pack(&self.q, n, k),
            }
        })
    }

    /// Rows of several weights stacked (e.g. query, key and value into one product). Exact,
    /// since every row keeps its own scale.
    pub fn stack(name: &str, parts: &[&QTensor]) -> Self {
        let mut q = Vec::new();
        let mut scale = Vec::new();
        let mut shape = parts[0].shape.clone();
        shape[0] = 0;
        for p in parts {
            q.extend_from_slice(&p.q);
            scale.extend_from_slice(&p.scale);
            shape[0] += p.shape[0];
        }
        let act = parts
            .iter()
            .map(|p| p.act_scale)
            .try_fold(0f32, |a, s| s.map(|s| a.max(s)));
        Self::from_parts(name, parts[0].kind, shape, q, scale, act)
    }

    /// Stored bytes: int8 values and f32 scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len() + 4 * usize::from(self.act_scale.is_some())
    }
}

/// Activation statistics recorded while calibrating: per layer, the largest |x| and a sample
/// of inputs for the sensitivity check.
#[derive(Debug, Default)]
pub struct Calibration {
    pub max_abs: BTreeMap<String, f32>,
    /// Up to [`SAMPLE_ROWS`] input rows (`[rows, k]`), or one image (`[1, h, w, c]`).
    pub samples: BTreeMap<String, (Vec<f32>, Vec<usize>)>,
}

/// Input rows kept per layer for the sensitivity check.
pub const SAMPLE_ROWS: usize = 256;

impl Calibration {
    /// Records the input `x` of layer `name` (f32, contiguous).
    pub fn observe(&mut self, name: &str, x: &[f32], dims: &[usize]) {
        let max = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let m = self.max_abs.entry(name.to_string()).or_insert(0.0);
        *m = m.max(max);
        if self.samples.contains_key(name) || x.is_empty() {
            return;
        }
        let sample = match dims {
            [n, h, w, c] if *n > 0 => (x[..h * w * c].to_vec(), vec![1, *h, *w, *c]),
            _ => {
                let k = dims.last().copied().unwrap_or(1).max(1);
                let rows = (x.len() / k).min(SAMPLE_ROWS);
                (x[..rows * k].to_vec(), vec![rows, k])
            }
        };
        self.samples.insert(name.to_string(), sample);
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    pub name: String,
    pub kind: LayerKind,
    /// `int8`, or why it stayed `f32`.
    pub status: String,
    /// Relative L2 error of the layer's int8 output (or weights, without calibration data).
    pub error: f32,
    pub params: usize,
}

/// The outcome of [`quantize`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantReport {
    pub mode: QuantMode,
    pub layers: Vec<LayerReport>,
}

impl QuantReport {
    pub fn quantized(&self) -> usize {
        self.layers.iter().filter(|l| l.status == "int8").count()
    }
}

/// Whether `name` matches a `--skip` pattern.
pub fn skip_matches(pattern: &str, name: &str) -> bool {
    if pattern.contains('*') {
        let parts: Vec<&str> = pattern.split('*').collect();
        let mut rest = name;
        for (i, part) in parts.iter().enumerate() {
            if i == 0 {
                let Some(r) = rest.strip_prefix(part) else {
                    return false;
                };
                rest = r;
            } else if i == parts.len() - 1 {
                return rest.ends_with(part);
            } else {
                match rest.find(part) {
                    Some(at) => rest = &rest[at + part.len()..],
                    None => return false,
                }
            }
        }
        rest.is_empty()
    } else {
        name == pattern
            || (pattern.ends_with('.') && name.starts_with(pattern))
            || name
                .strip_prefix(pattern)
                .is_some_and(|r| r.starts_with('.'))
    }
}

/// Quantizes `model` in place: its weights become int8 in its [`ParamStore`](crate::model::ParamStore), and its forward
/// pass (same trait, same object) runs the int8 kernels from then on. `calib` supplies
/// calibration batches (needed in static mode; without it the sensitivity check compares
/// weights only).
pub fn quantize(
    model: &dyn Model,
    cfg: &QuantConfig,
    calib: Option<&dyn Source>,
) -> Result<QuantReport> {
    let layers = model.quant_layers();
    if layers.is_empty() {
        return Err(Error::Config(format!(
            "model kind `{}` lists no quantizable layers; implement Model::quant_layers to quantize it",
            model.kind()
        )));
    }
    for p in &cfg.skip {
        if !layers.iter().any(|l| skip_matches(p, &l.name)) {
            let names: Vec<&str> = layers.iter().take(6).map(|l| l.name.as_str()).collect();
            return Err(Error::Config(format!(
                "--skip {p:?} matches no quantizable layer; layers are named like {}",
                names.join(", ")
            )));
        }
    }
    let store = model.store();
    let calibration = match calib {
        Some(src) if cfg.calib_batches > 0 => Some(calibrate(model, src, cfg)?),
        _ if cfg.mode == QuantMode::Static => {
            return Err(Error::Config(
                "static quantization needs calibration batches (--calib N with N ≥ 1)".into(),
            ))
        }
        _ => None,
    };
    let mut report = Vec::new();
    for l in &layers {
        let var = store.get(&l.name).ok_or_else(|| {
            Error::Config(format!(
                "quant_layers names `{}`, which is not a parameter of the model",
                l.name
            ))
        })?;
        let w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let shape = var.dims().to_vec();
        let mut qt = QTensor::quantize(&l.name, l.kind, &w, &shape);
        let mut status = "int8".to_string();
        if cfg.skip.iter().any(|p| skip_matches(p, &l.name)) {
            status = "f32 (skipped)".into();
        }
        if let (Some(c), LayerKind::Linear | LayerKind::Conv2d) = (&calibration, l.kind) {
            if cfg.mode == QuantMode::Static {
                match c.max_abs.get(&l.name) {
                    Some(&m) => qt.act_scale = Some(m / 127.0),
                    None => status = "f32 (not reached by calibration)".into(),
                }
            }
        }
        let sample = calibration.as_ref().and_then(|c| c.samples.get(&l.name));
        let error = match (sample, l.kind) {
            (Some((x, dims)), LayerKind::Linear | LayerKind::Conv2d) => {
                ops::output_error(&qt, &w, x, dims, l.conv)?
            }
            _ => rel_error(&w, &qt.dequantize()),
        };
        if status == "int8" && (error.is_nan() || error > cfg.max_error) {
            status = format!("f32 (error {error:.3} > {})", cfg.max_error);
        }
        if status == "int8" {
            store.set_quantized(Arc::new(qt))?;
        }
        report.push(LayerReport {
            name: l.name.clone(),
            kind: l.kind,
            status,
            error,
            params: w.len(),
        });
    }
    Ok(QuantReport {
        mode: cfg.mode,
        layers: report,
    })
}

/// Runs up to `cfg.calib_batches` batches of `src` through the f32 model, recording every
/// quantizable layer's inputs.
fn calibrate(model: &dyn Model, src: &dyn Source, cfg: &QuantConfig) -> Result<Calibration> {
    let store = model.store();
    let rows = cfg.calib_batch_size.min(model.eval_batch()).max(1);
    let plan = BatchPlan::sequential(src.len(), rows);
    store.start_calibration();
    let run = || -> Result<()> {
        for i in 0..plan.len().min(cfg.calib_batches) {
            let b = plan.batch(src, i, store.device())?;
            let mut ctx = ModelCtx::eval().with_mask(b.mask.clone());
            model.forward(&b.x, &mut ctx)?;
        }
        Ok(())
    };
    let r = run();
    let c = store.finish_calibration();
    r?;
    Ok(c)
}

/// `‖a − b‖ / ‖a‖` for a reference `a`, accumulated in f64 (0 for a zero reference).
pub fn rel_error(a: &[f32], b: &[f32]) -> f32 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (x as f64).powi(2);
    }
    if den == 0.0 {
        0.0
    } else {
        (num / den).sqrt() as f32
    }
}
