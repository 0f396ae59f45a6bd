//! [`Source`]: what the trainer reads batches from — an in-memory table or memory-mapped
//! shards — and the shard-backed source with parallel preprocessing.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::shard::{Dtype, Stats};
use super::shardset::ShardSet;
use super::{Batch, Dataset, Targets};
use crate::{Error, Result};

/// What keys the random augmentation of a training batch: the run seed and the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    pub seed: u64,
    pub epoch: u64,
}

/// Random-access samples that collate into batches.
pub trait Source: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Collates the samples `idx` (in that order) into a batch on `device`.
    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch>;

    /// As [`Self::gather`], with random augmentation keyed by `aug` (training batches);
    /// sources without augmentation ignore it.
    fn gather_augmented(
        &self,
        idx: &[u32],
        aug: Option<Augment>,
        device: &Device,
    ) -> Result<Batch> {
        let _ = aug;
        self.gather(idx, device)
    }

    /// Targets of every sample, in index order (for evaluation metrics).
    fn targets(&self) -> Result<Targets>;

    /// Whether [`Self::gather_augmented`] changes samples at random (so that a sample's
    /// model input differs between epochs).
    fn augments(&self) -> bool {
        false
    }

    /// Contiguous index ranges that live together on disk (shards), for the block shuffle;
    /// `None` when the source is in memory.
    fn blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        None
    }

    /// Whether collating is costly enough to run on a background thread ahead of the step
    /// (for an in-memory table the hand-off costs more than it saves).
    fn prefetch(&self) -> bool {
        true
    }
}

impl Source for Dataset {
    fn len(&self) -> usize {
        self.n
    }

    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch> {
        super::loader::gather(self, idx, device)
    }

    fn targets(&self) -> Result<Targets> {
        Ok(self.y.clone())
    }

    fn prefetch(&self) -> bool {
        false
    }
}

/// A subset of another source (a seeded train/eval split of one shard directory).
pub struct Subset {
    pub inner: Arc<dyn Source>,
    pub idx: Vec<u32>,
}

impl Source for Subset {
    fn len(&self) -> usize {
        self.idx.len()
    }

    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch> {
        self.gather_augmented(idx, None, device)
    }

    fn gather_augmented(
        &self,
        idx: &[u32],
        aug: Option<Augment>,
        device: &Device,
    ) -> Result<Batch> {
        let mapped: Vec<u32> = idx.iter().map(|&i| self.idx[i as usize]).collect();
        self.inner.gather_augmented(&mapped, aug, device)
    }

    fn targets(&self) -> Result<Targets> {
        Ok(match self.inner.targets()? {
            Targets::Classes(c) => {
                Targets::Classes(self.idx.iter().map(|&i| c[i as usize]).collect())
            }
            Targets::Values(v) => {
                Targets::Values(self.idx.iter().map(|&i| v[i as usize]).collect())
            }
        })
    }

    fn prefetch(&self) -> bool {
        self.inner.prefetch()
    }

    fn augments(&self) -> bool {
        self.inner.augments()
    }

    fn blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        // `idx` is sorted, so each inner block maps to a contiguous run of subset positions.
        let inner = self.inner.blocks()?;
        let mut out = Vec::new();
        for b in inner {
            let lo = self.idx.partition_point(|&i| (i as usize) < b.start);
            let hi = self.idx.partition_point(|&i| (i as usize) < b.end);
            if hi > lo {
                out.push(lo..hi);
            }
        }
        Some(out)
    }
}

/// Rows below which a batch is collated on the calling thread (spawning costs more).
const PARALLEL_MIN_ELEMS: usize = 1 << 14;

/// Samples of a shard directory: an input field flattened to f32 features, normalized as
/// `(x - mean) / std`, and a label field.
pub struct ShardSource {
    pub set: ShardSet,
    x: usize,
    y: usize,
    dim: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// No normalization: mean 0 and scale 1.
    identity: bool,
    classification: bool,
}

/// The bytes as f32 values, if they are 4-byte aligned (and the machine is little-endian, as
/// the shards are).
fn as_f32(b: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: any 4 bytes are a valid f32; `align_to` only yields the aligned middle part.
    let (pre, mid, post) = unsafe { b.align_to::<f32>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

impl ShardSource {
    /// `input`: the field fed to the model (fixed shape, any dtype); `label`: a scalar field.
    /// With `norm`, features are standardized by these statistics (one value, or one per
    /// feature).
    pub fn new(set: ShardSet, input: &str, label: &str, norm: Option<&Stats>) -> Result<Self> {
        let dir = set.dir.display().to_string();
        let find = |name: &str, what: &str| {
            set.field_index(name).ok_or_else(|| {
                let names: Vec<&str> = set
                    .manifest
                    .fields
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect();
                Error::Data(format!(
                    "{dir}: no field `{name}` ({what}); the fields are {}",
                    names.join(", ")
                ))
            })
        };
        let x = find(input, "data.input")?;
        let y = find(label, "data.label")?;
        let xf = &set.manifest.fields[x];
        let dim = xf.numel().ok_or_else(|| {
            Error::Data(format!(
                "{dir}: field `{input}` has variable length; an MLP needs a fixed-shape input"
            ))
        })?;
        let yf = &set.manifest.fields[y];
        if yf.numel() != Some(1) {
            return Err(Error::Data(format!(
                "{dir}: label field `{label}` must hold one value per sample"
            )));
        }
        let (mean, inv_std) = match norm {
            Some(s)
                if s.std.len() == s.mean.len() && (s.mean.len() == 1 || s.mean.len() == dim) =>
            {
                (
                s.mean.iter().map(|&m| m as f32).collect(),
                s.std
                    .iter()
                    .map(|&v| if v < 1e-6 { 1.0 } else { (1.0 / v) as f32 })
                    .collect(),
                )
            }
            Some(s) => {
                return Err(Error::Data(format!(
                    "{dir}: statistics of `{input}` have {} means and {} standard deviations for {dim} features; re-run `wick data pack`",
                    s.mean.len(),
                    s.std.len()
                )))
            }
            None => (vec![0.0], vec![1.0]),
        };
        let classification = yf.dtype != Dtype::F32;
        let identity = mean.iter().all(|&m| m == 0.0) && inv_std.iter().all(|&s| s == 1.0);
        Ok(Self {
            set,
            x,
            y,
            dim,
            mean,
            inv_std,
            identity,
            classification,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn row(&self, i: usize, out: &mut [f32]) {
        let b = self.set.bytes(self.x, i);
        let dtype = self.set.manifest.fields[self.x].dtype;
        let (m, s) = (&self.mean, &self.inv_std);
        if dtype == Dtype::F32 {
            if let Some(v) = as_f32(b) {
                // Aligned little-endian f32 in the map: a copy, or one fused pass.
                match (m.len(), self.identity) {
                    (_, true) => out.copy_from_slice(v),
                    (1, false) => {
                        let (m, s) = (m[0], s[0]);
                        out.iter_mut().zip(v).for_each(|(o, &x)| *o = (x - m) * s);
                    }
                    _ => out
                        .iter_mut()
                        .zip(v)
                        .zip(m.iter().zip(s))
                        .for_each(|((o, &x), (&m, &s))| *o = (x - m) * s),
                }
                return;
            }
        }
        let norm = |j: usize, v: f32| {
            if m.len() == 1 {
                (v - m[0]) * s[0]
            } else {
                (v - m[j]) * s[j]
            }
        };
        match dtype {
            Dtype::U8 => {
                for (j, (o, &v)) in out.iter_mut().zip(b).enumerate() {
                    *o = norm(j, v as f32);
                }
            }
            Dtype::F32 => {
                for (j, (o, c)) in out.iter_mut().zip(b.chunks_exact(4)).enumerate() {
                    *o = norm(j, f32::from_le_bytes(c.try_into().unwrap()));
                }
            }
            Dtype::U32 => {
                for (j, (o, c)) in out.iter_mut().zip(b.chunks_exact(4)).enumerate() {
                    *o = norm(j, u32::from_le_bytes(c.try_into().unwrap()) as f32);
                }
            }
            Dtype::I64 => {
                for (j, (o, c)) in out.iter_mut().zip(b.chunks_exact(8)).enumerate() {
                    *o = norm(j, i64::from_le_bytes(c.try_into().unwrap()) as f32);
                }
            }
        }
    }
}

impl Source for ShardSource {
    fn len(&self) -> usize {
        self.set.len()
    }

    fn blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        Some(self.set.blocks())
    }

    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch> {
        let n = idx.len();
        let d = self.dim;
        let mut x: Vec<f32> = Vec::with_capacity(n * d);
        // Each row is written into its own slot, so the batch is the same whatever the
        // number of threads. The buffer is not zeroed first: every element is written once.
        {
            let spare = &mut x.spare_capacity_mut()[..n * d];
            // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; `row` writes every element
            // of its slice and reads none before writing.
            let out: &mut [f32] =
                unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<f32>(), n * d) };
            if n * d >= PARALLEL_MIN_ELEMS {
                out.par_chunks_mut(d)
                    .zip(idx.par_iter())
                    .for_each(|(row, &i)| self.row(i as usize, row));
            } else {
                for (row, &i) in out.chunks_mut(d).zip(idx) {
                    self.row(i as usize, row);
                }
            }
        }
        // SAFETY: all n × d elements were initialised above.
        unsafe { x.set_len(n * d) };
        let x = Tensor::from_vec(x, (n, d), device)?;
        let y = if self.classification {
            let y: Vec<u32> = idx
                .iter()
                .map(|&i| self.set.label(self.y, i as usize) as u32)
                .collect();
            Tensor::from_vec(y, n, device)?
        } else {
            let y: Vec<f32> = idx
                .iter()
                .map(|&i| {
                    f32::from_le_bytes(self.set.bytes(self.y, i as usize)[..4].try_into().unwrap())
                })
                .collect();
            Tensor::from_vec(y, (n, 1), device)?
        };
        Ok(Batch {
            x,
            y,
            n,
            mask: None,
        })
    }

    fn targets(&self) -> Result<Targets> {
        let n = self.len();
        Ok(if self.classification {
            Targets::Classes((0..n).map(|i| self.set.label(self.y, i) as u32).collect())
        } else {
            Targets::Values(
                (0..n)
                    .map(|i| f32::from_le_bytes(self.set.bytes(self.y, i)[..4].try_into().unwrap()))
                    .collect(),
            )
        })
    }
}
