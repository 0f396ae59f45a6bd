//! Seeded, resumable mini-batches over an in-memory [`Dataset`].
//!
//! Epoch `e` visits the training rows in the order of a permutation drawn from the keyed
//! stream `(seed, "shuffle", e)`, so the order of any epoch can be recomputed from the seed
//! alone: a resumed run continues at the exact batch, whatever happened before.

use candle_core::{Device, Tensor};

use std::ops::Range;

use super::source::Augment;
use super::{Dataset, Source, Targets};
use crate::rng::Rng;
use crate::Result;

/// One collated mini-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Features, `[n, d]` f32.
    pub x: Tensor,
    /// Class indices `[n]` u32, or regression targets `[n, 1]` f32.
    pub y: Tensor,
    /// Number of rows.
    pub n: usize,
}

/// The batches of one epoch.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    order: Vec<u32>,
    batch_size: usize,
    drop_last: bool,
    /// Training plans augment their batches, keyed by seed and epoch.
    augment: Option<Augment>,
}

impl BatchPlan {
    /// The shuffled plan for `epoch`.
    pub fn shuffled(n: usize, batch_size: usize, drop_last: bool, seed: u64, epoch: u64) -> Self {
        Self {
            order: Rng::keyed(seed, "shuffle", epoch).permutation(n),
            batch_size,
            drop_last,
            augment: Some(Augment { seed, epoch }),
        }
    }

    /// A plan that visits rows in order (evaluation).
    pub fn sequential(n: usize, batch_size: usize) -> Self {
        Self {
            order: (0..n as u32).collect(),
            batch_size,
            drop_last: false,
            augment: None,
        }
    }

    /// Number of batches in the epoch.
    pub fn len(&self) -> usize {
        if self.drop_last {
            self.order.len() / self.batch_size
        } else {
            self.order.len().div_ceil(self.batch_size)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row indices of batch `i`.
    pub fn indices(&self, i: usize) -> &[u32] {
        let start = i * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        &self.order[start..end]
    }

    /// Collates batch `i` of `src` on `device`.
    pub fn batch(&self, src: &dyn Source, i: usize, device: &Device) -> Result<Batch> {
        src.gather_augmented(self.indices(i), self.augment, device)
    }
}

/// Runs `consume` over batches `range` of `plan`, collated by a background thread that
/// keeps up to `depth` batches ready (a bounded queue, so memory stays bounded). The batches
/// arrive in order, so results do not depend on timing. With `depth` 0, batches are collated
/// on the calling thread as they are consumed.
pub fn with_prefetch<R>(
    src: &dyn Source,
    plan: &BatchPlan,
    range: Range<usize>,
    device: &Device,
    depth: usize,
    consume: impl FnOnce(&mut dyn Iterator<Item = (usize, Result<Batch>)>) -> R,
) -> R {
    if depth == 0 {
        let mut it = range.map(|b| (b, plan.batch(src, b, device)));
        return consume(&mut it);
    }
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth);
        s.spawn(move || {
            for b in range {
                // A closed channel means the consumer stopped early.
                if tx.send((b, plan.batch(src, b, device))).is_err() {
                    break;
                }
            }
        });
        let mut it = rx.into_iter();
        consume(&mut it)
    })
}

/// Collates the rows `idx` of `ds`.
pub fn gather(ds: &Dataset, idx: &[u32], device: &Device) -> Result<Batch> {
    let d = ds.d;
    let mut x = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        let i = i as usize;
        x.extend_from_slice(&ds.x[i * d..(i + 1) * d]);
    }
    let n = idx.len();
    let x = Tensor::from_vec(x, (n, d), device)?;
    let y = match &ds.y {
        Targets::Classes(c) => Tensor::from_vec(
            idx.iter().map(|&i| c[i as usize]).collect::<Vec<u32>>(),
            n,
            device,
        )?,
        Targets::Values(v) if v.is_empty() => {
            Tensor::zeros((n, 1), candle_core::DType::F32, device)?
        }
        Targets::Values(v) => Tensor::from_vec(
            idx.iter().map(|&i| v[i as usize]).collect::<Vec<f32>>(),
            (n, 1),
            device,
        )?,
    };
    Ok(Batch { x, y, n })
}
