//! The parts of data-parallel training that sit on a [`Communicator`]: equal replicas at the
//! start, averaged gradients after every backward, and metrics reduced across ranks.

use crate::dist::Communicator;
use crate::model::kernels::update_in_place;
use crate::model::{Grads, Param};
use crate::{Error, Result};

/// Copies rank 0's values of `params` to every rank, so all replicas start equal (and stay
/// equal, since every rank then applies the same averaged gradients).
pub fn broadcast_params(comm: &dyn Communicator, params: &[Param]) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    for p in params {
        let mut res = Ok(());
        update_in_place(p.var.as_tensor(), |s| res = comm.broadcast(s, 0))?;
        res.map_err(|e| Error::Dist(format!("broadcasting {}: {e}", p.name)))?;
    }
    Ok(())
}

/// Parameters of at least this many values (1 MB) are all-reduced on their own, straight from
/// their gradient buffer; smaller ones share buckets.
const DIRECT_MIN: usize = 1 << 18;

/// Averages gradients across ranks, flattened into buckets of a fixed size (PyTorch's DDP
/// uses 25 MB), so that a model of many small tensors costs a few large messages and a model
/// of huge tensors never needs a second full copy of its gradients.
pub struct GradReducer {
    /// The bucket being filled (what this rank sends) and what the all-reduce returns.
    send: Vec<f32>,
    recv: Vec<f32>,
    cap: usize,
    /// Whether the communicator was asked for shared gradient memory yet.
    asked_shared: bool,
}

impl GradReducer {
    /// A reducer whose buckets hold `bucket_mb` megabytes of f32 (at least one value).
    pub fn new(bucket_mb: f64) -> Self {
        Self {
            send: Vec::new(),
            recv: Vec::new(),
            cap: ((bucket_mb * 1e6 / 4.0) as usize).max(1),
            asked_shared: false,
        }
    }

    /// Values per bucket.
    pub fn bucket_len(&self) -> usize {
        self.cap
    }

    /// Replaces every gradient by its mean over the ranks. Parameters are packed in order,
    /// a large one split across buckets, so the result does not depend on the bucket size.
    /// Small gradients are copied into the bucket and back (scaled by 1/world); large ones
    /// are sent from their own buffer and only copied back. A backend that can reduce the
    /// gradient buffers in place ([`Communicator::all_reduce_mean_parts`]: MPI ranks on one
    /// machine) gets them directly. The first call asks the communicator for shared gradient
    /// memory ([`Communicator::shared_grads`]: MPI ranks on one machine, small models) and
    /// moves `grads` there, so that later calls read them where backward wrote them.
    pub fn all_reduce_mean(&mut self, comm: &dyn Communicator, grads: &mut Grads) -> Result<()> {
        let world = comm.world();
        if world == 1 {
            return Ok(());
        }
        if !self.asked_shared {
            self.asked_shared = true;
            if let Some(shared) = comm.shared_grads(grads.flat().len()) {
                grads.place_in(shared?);
            }
        }
        if let Some(shared) = grads.shared_mut() {
            return comm.all_reduce_mean_shared(shared);
        }
        // Ranks on one machine: the gradients go to shared memory and back, no bucket.
        let mut parts = grads.bufs_mut();
        if let Some(res) = comm.all_reduce_mean_parts(&mut parts) {
            return res;
        }
        let inv = 1.0 / world as f32;
        let cap = self.cap;
        // (parameter, offset, len) of each piece in the current bucket.
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        let flush = |send: &mut Vec<f32>,
                     recv: &mut Vec<f32>,
                     pieces: &mut Vec<(usize, usize, usize)>,
                     grads: &mut Grads|
         -> Result<()> {
            if send.is_empty() {
                return Ok(());
            }
            recv.resize(send.len().max(recv.len()), 0.0);
            comm.all_reduce_sum_into(send, &mut recv[..send.len()])?;
            let mut at = 0;
            for &(i, off, len) in pieces.iter() {
                for (g, r) in grads.buf_mut(i)[off..off + len]
                    .iter_mut()
                    .zip(&recv[at..at + len])
                {
                    *g = r * inv;
                }
                at += len;
            }
            send.clear();
            pieces.clear();
            Ok(())
        };
        for i in 0..grads.len() {
            let mut off = 0;
            let n = grads.buf(i).len();
            if n >= DIRECT_MIN {
                // Large enough to be its own message: sent straight from the gradient buffer
                // (in pieces of at most a bucket), which saves a copy.
                while off < n {
                    let len = cap.min(n - off);
                    self.recv.resize(len.max(self.recv.len()), 0.0);
                    comm.all_reduce_sum_into(&grads.buf(i)[off..off + len], &mut self.recv[..len])?;
                    for (g, r) in grads.buf_mut(i)[off..off + len].iter_mut().zip(&self.recv) {
                        *g = r * inv;
                    }
                    off += len;
                }
                continue;
            }
            while off < n {
                let len = (cap - self.send.len()).min(n - off);
                self.send.extend_from_slice(&grads.buf(i)[off..off + len]);
                pieces.push((i, off, len));
                off += len;
                if self.send.len() == cap {
                    flush(&mut self.send, &mut self.recv, &mut pieces, grads)?;
                }
            }
        }
        flush(&mut self.send, &mut self.recv, &mut pieces, grads)
    }
}

/// Sums `values` over the ranks (f64), in place; the identity for one rank.
pub fn sum_f64(comm: &dyn Communicator, values: &mut [f64]) -> Result<()> {
    if comm.world() > 1 {
        comm.all_reduce_sum_f64(values)?;
    }
    Ok(())
}

/// `n` rows of `width` values computed in shares: `rows` runs on this rank's [`shard`] of
/// `0..n`, and every rank returns all the rows (the other shares arrive through an all-reduce
/// over zeros, which is exact). `what` names the values in the error when `rows` returns the
/// wrong number of them.
pub fn gather_rows(
    comm: &dyn Communicator,
    n: usize,
    width: usize,
    what: &str,
    rows: impl FnOnce(std::ops::Range<usize>) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let (lo, hi) = shard(n, comm.rank(), comm.world());
    let part = rows(lo..hi)?;
    if part.len() != (hi - lo) * width {
        return Err(Error::Train(format!(
            "the model gave {} {what} for {} rows of width {width}",
            part.len(),
            hi - lo
        )));
    }
    if comm.world() == 1 {
        return Ok(part);
    }
    let mut all = vec![0f32; n * width];
    all[lo * width..hi * width].copy_from_slice(&part);
    comm.all_reduce_sum(&mut all)?;
    Ok(all)
}

/// The part `lo..hi` of `0..n` that rank `rank` of `world` evaluates.
pub fn shard(n: usize, rank: usize, world: usize) -> (usize, usize) {
    (n * rank / world, n * (rank + 1) / world)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two fake ranks in one process: a "sum" doubles the values, as if the other rank held
    /// the same gradients.
    struct Twin;
    impl Communicator for Twin {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "twin"
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            buf.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            buf.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    #[test]
    fn buckets_split_and_restore_every_gradient() {
        let mut g = Grads::from_vecs(
            vec!["a".into(), "b".into(), "c".into(), "d".into()],
            vec![
                (0..7).map(|v| v as f32).collect(),
                vec![],
                (0..13).map(|v| -(v as f32)).collect(),
                (0..DIRECT_MIN + 5).map(|v| (v % 101) as f32).collect(),
            ],
        );
        let want = g.flat().to_vec();
        // 3 values per bucket: parameters are cut across buckets.
        let mut r = GradReducer::new(12e-6);
        assert_eq!(r.bucket_len(), 3);
        r.all_reduce_mean(&Twin, &mut g).unwrap();
        assert_eq!(g.flat(), want);
        let mut doubled = g.clone();
        doubled.buf_mut(0)[3] = 10.0;
        let mut r = GradReducer::new(25.0);
        r.all_reduce_mean(&Twin, &mut doubled).unwrap();
        assert_eq!(doubled.buf(0)[3], 10.0);
    }

    #[test]
    fn shards_cover_every_row_once() {
        for n in [0, 1, 5, 64, 1437] {
            for world in 1..5 {
                let mut next = 0;
                for r in 0..world {
                    let (lo, hi) = shard(n, r, world);
                    assert_eq!(lo, next);
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }
}
