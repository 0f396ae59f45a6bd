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
    /// Features `[n, d]` f32, or token ids `[n, L]` u32 for text.
    pub x: Tensor,
    /// Class indices `[n]` u32, or regression targets `[n, 1]` f32.
    pub y: Tensor,
    /// Number of rows.
    pub n: usize,
    /// Token batches: the attention mask `[n, L]` (1 = token, 0 = padding).
    pub mask: Option<Tensor>,
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

    /// A shard-aware shuffle for datasets far larger than memory: the order of the blocks
    /// (shards) is shuffled, then samples are shuffled within windows of `window` consecutive
    /// blocks, so an epoch reads only `window` shards at a time.
    pub fn block_shuffled(
        blocks: &[Range<usize>],
        window: usize,
        batch_size: usize,
        drop_last: bool,
        seed: u64,
        epoch: u64,
    ) -> Self {
        let mut rng = Rng::keyed(seed, "block-shuffle", epoch);
        let mut order_of_blocks: Vec<usize> = (0..blocks.len()).collect();
        rng.shuffle(&mut order_of_blocks);
        let mut order = Vec::with_capacity(blocks.last().map(|b| b.end).unwrap_or(0));
        for group in order_of_blocks.chunks(window.max(1)) {
            let start = order.len();
            for &b in group {
                order.extend(blocks[b].clone().map(|i| i as u32));
            }
            rng.shuffle(&mut order[start..]);
        }
        Self {
            order,
            batch_size,
            drop_last,
            augment: Some(Augment { seed, epoch }),
        }
    }

    /// This rank's part of a data-parallel plan: `self` is the global plan (batch size =
    /// per-rank batch × `world`), and each global batch is cut into `world` equal contiguous
    /// parts. A last batch whose size is not a multiple of `world` is padded with the epoch's
    /// first samples (as PyTorch's `DistributedSampler` pads), so every rank takes the same
    /// number of equal steps; every sample goes to exactly one rank, padding aside.
    pub fn for_rank(&self, rank: usize, world: usize) -> Self {
        assert!(world > 0 && rank < world, "rank {rank} of world {world}");
        let mut order = Vec::with_capacity(self.order.len() / world + world);
        let mut per_rank = 1;
        for i in 0..self.len() {
            let mut b = self.indices(i).to_vec();
            let short = (world - b.len() % world) % world;
            b.extend(self.order.iter().cycle().take(short));
            let q = b.len() / world;
            order.extend_from_slice(&b[rank * q..(rank + 1) * q]);
            if i == 0 {
                per_rank = q.max(1);
            }
        }
        Self {
            order,
            batch_size: per_rank,
            drop_last: false,
            augment: self.augment,
        }
    }

    /// A plan that visits rows in order (evaluation).
    pub fn sequential(n: usize, batch_size: usize) -> Self {
        Self::sequential_range(0..n, batch_size)
    }

    /// A plan that visits rows `rows` in order (one rank's share of an evaluation).
    pub fn sequential_range(rows: Range<usize>, batch_size: usize) -> Self {
        Self {
            order: (rows.start as u32..rows.end as u32).collect(),
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
    Ok(Batch {
        x,
        y,
        n,
        mask: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_every_global_batch() {
        let global = BatchPlan::shuffled(103, 20, false, 3, 1);
        let ranks: Vec<BatchPlan> = (0..4).map(|r| global.for_rank(r, 4)).collect();
        for r in &ranks {
            assert_eq!(r.len(), global.len());
        }
        let last = global.len() - 1;
        for i in 0..last {
            let joined: Vec<u32> = ranks.iter().flat_map(|r| r.indices(i).to_vec()).collect();
            assert_eq!(joined, global.indices(i), "batch {i}");
        }
        // The short last batch (3 samples) is padded with the epoch's first sample.
        let sizes: Vec<usize> = ranks.iter().map(|r| r.indices(last).len()).collect();
        assert_eq!(sizes, [1, 1, 1, 1]);
        let joined: Vec<u32> = ranks
            .iter()
            .flat_map(|r| r.indices(last).to_vec())
            .collect();
        assert_eq!(&joined[..3], global.indices(last));
        assert_eq!(joined[3], global.indices(0)[0]);
    }

    #[test]
    fn block_shuffle_visits_each_sample_once_window_by_window() {
        let blocks: Vec<Range<usize>> = (0..10).map(|b| b * 50..(b + 1) * 50).collect();
        let plan = BatchPlan::block_shuffled(&blocks, 2, 25, false, 9, 0);
        let mut all: Vec<u32> = (0..plan.len())
            .flat_map(|i| plan.indices(i).to_vec())
            .collect();
        // Each window of 100 consecutive positions draws from exactly two blocks.
        for w in all.chunks(100) {
            let mut bs: Vec<u32> = w.iter().map(|&i| i / 50).collect();
            bs.sort();
            bs.dedup();
            assert_eq!(bs.len(), 2);
        }
        all.sort();
        assert_eq!(all, (0..500).collect::<Vec<u32>>());
        let other = BatchPlan::block_shuffled(&blocks, 2, 25, false, 9, 1);
        assert_ne!(plan.indices(0), other.indices(0));
    }
}
