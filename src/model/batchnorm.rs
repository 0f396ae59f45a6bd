//! Batch normalization over the channel (last) axis of NHWC activations, as candle custom ops.
//!
//! candle-nn's BatchNorm only runs in evaluation mode. In training, [`BatchNorm2d`] normalizes
//! with the batch statistics, updates the running statistics in place (PyTorch's momentum and
//! unbiased variance), and backpropagates through the statistics. A frozen layer runs in
//! evaluation mode, as a per-channel affine map. Parameter names follow PyTorch
//! (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::op_f32;
use super::kernels::update_in_place;
use super::vecmath::dispatch_wide;

/// Rows per partial sum: the reduction order depends only on the shape, not on the threads.
const ROWS: usize = 256;

fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Per-channel sums of `f(block, acc)` over blocks of [`ROWS`] rows of `x` (`[rows, c]`), in
/// f64, in a fixed order.
fn channel_sums(x: &[f32], c: usize, f: impl Fn(&[f32], &mut [f64]) + Sync) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = x
        .par_chunks(ROWS * c)
        .map(|chunk| {
            let mut acc = vec![0f64; c];
            f(chunk, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f64; c];
    for p in parts {
        total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
    }
    total
}

dispatch_wide!(add_rows(x: &[f32], acc: &mut [f64]) {
    for row in x.chunks_exact(acc.len()) {
        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
    }
});

dispatch_wide!(add_squared_deviations(x: &[f32], mean: &[f64], acc: &mut [f64]) {
    for row in x.chunks_exact(acc.len()) {
        for ((a, &v), m) in acc.iter_mut().zip(row).zip(mean) {
            let d = v as f64 - m;
            *a += d * d;
        }
    }
});

// `o = max(x·scale + shift, 0)` per channel (the ReLU only with `relu`), rows of `c` values.
dispatch_wide!(affine_rows(x: &[f32], scale: &[f32], shift: &[f32], relu: bool, o: &mut [f32]) {
    let c = scale.len();
    for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((o, &x), &a), &b) in o.iter_mut().zip(x).zip(scale).zip(shift) {
            let v = x * a + b;
            *o = if relu { v.max(0.0) } else { v };
        }
    }
});

/// Mean and biased variance of each channel.
fn moments(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = (x.len() / c).max(1) as f64;
    let sum = channel_sums(x, c, add_rows);
    let mean: Vec<f64> = sum.iter().map(|s| s / rows).collect();
    let sq = channel_sums(x, c, |x, acc| add_squared_deviations(x, &mean, acc));
    (
        mean.iter().map(|&m| m as f32).collect(),
        sq.iter().map(|s| (s / rows) as f32).collect(),
    )
}

/// The gradient reaching the batch norm's output: `dy`, or `dy · [y > 0]` through its ReLU.
#[inline(always)]
fn masked(dy: f32, y: f32, relu: bool) -> f32 {
    // As the ReLU's own backward: the gradient passes where the output is positive (a NaN
    // output passes none).
    if !relu || y > 0.0 {
        dy
    } else {
        0.0
    }
}

/// What the backward kernels read besides the activations: the batch statistics, the fused
/// ReLU, and (for the input gradient) `k = γ·inv / n`, `Σdy`, `Σdy·x̂` and `n`.
struct Back<'a> {
    mean: &'a [f32],
    inv: &'a [f32],
    relu: bool,
    k: &'a [f32],
    dbeta: &'a [f32],
    dgamma: &'a [f32],
    nf: f32,
}

// `acc[..c] += Σ dy`, `acc[c..] += Σ dy·x̂` over rows of `c` values (`dy` masked by the
// output `y` through the fused ReLU).
dispatch_wide!(grad_sums(x: &[f32], dy: &[f32], y: &[f32], p: &Back, acc: &mut [f32]) {
    let c = p.mean.len();
    let (mean, inv) = (&p.mean[..c], &p.inv[..c]);
    let (a, b) = acc.split_at_mut(c);
    let (a, b) = (&mut a[..c], &mut b[..c]);
    for ((x, dy), y) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(y.chunks_exact(c)) {
        let (x, dy, y) = (&x[..c], &dy[..c], &y[..c]);
        for j in 0..c {
            let d = masked(dy[j], y[j], p.relu);
            let xh = (x[j] - mean[j]) * inv[j];
            a[j] += d;
            b[j] += d * xh;
        }
    }
});

// The input gradient `k·(n·dy − Σdy − x̂·Σdy·x̂)` over rows of `c` values.
dispatch_wide!(grad_input_rows(x: &[f32], dy: &[f32], y: &[f32], p: &Back, o: &mut [f32]) {
    let c = p.mean.len();
    let (mean, inv, k) = (&p.mean[..c], &p.inv[..c], &p.k[..c]);
    let (dbeta, dgamma) = (&p.dbeta[..c], &p.dgamma[..c]);
    for (((o, x), dy), y) in o
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(dy.chunks_exact(c))
        .zip(y.chunks_exact(c))
    {
        let (o, x, dy, y) = (&mut o[..c], &x[..c], &dy[..c], &y[..c]);
        for j in 0..c {
            let d = masked(dy[j], y[j], p.relu);
            let xh = (x[j] - mean[j]) * inv[j];
            o[j] = k[j] * (p.nf * d - dbeta[j] - xh * dgamma[j]);
        }
    }
});

/// Training-mode forward: `(x [.., c], weight [c], bias [c])` → normalized output. Keeps the
/// batch mean and inverse standard deviation for the backward pass.
struct BnTrain {
    eps: f32,
    /// Fused ReLU on the output.
    relu: bool,
    /// Batch mean, inverse standard deviation and biased variance of the last forward.
    saved: Arc<Mutex<Option<Saved>>>,
}

/// The batch statistics of a training-mode forward pass.
#[derive(Clone)]
pub(crate) struct Saved {
    pub mean: Vec<f32>,
    pub inv: Vec<f32>,
    /// Biased variance.
    pub var: Vec<f32>,
}

/// Training-mode batch norm of `x` (rows of `c = gamma.len()` channels) with the batch's own
/// statistics, and a ReLU when `relu`: the output and the statistics.
pub(crate) fn train_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    relu: bool,
) -> (Vec<f32>, Saved) {
    let c = gamma.len();
    let (mean, var) = moments(x, c);
    let inv: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = inv.iter().zip(gamma).map(|(i, g)| i * g).collect();
    let shift: Vec<f32> = (0..c).map(|j| beta[j] - mean[j] * scale[j]).collect();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(o, x)| affine_rows(x, &scale, &shift, relu, o));
    (out, Saved { mean, inv, var })
}

/// The backward pass of [`train_forward`]: from its input `x`, output `y` and the output's
/// gradient `dy`, the gradients of the input (when `need_dx`), `gamma` and `beta`.
pub(crate) fn train_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    saved: &Saved,
    gamma: &[f32],
    relu: bool,
    need_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (mean, inv) = (&saved.mean, &saved.inv);
    let c = mean.len();
    let rows = (x.len() / c).max(1);
    let mut p = Back {
        mean,
        inv,
        relu,
        k: &[],
        dbeta: &[],
        dgamma: &[],
        nf: rows as f32,
    };
    // dbeta = Σ dy, dgamma = Σ dy·x̂ (f32 within a block of rows, f64 across blocks); the
    // ReLU's mask is applied to dy on the fly.
    let sums = {
        let p = &p;
        let parts: Vec<Vec<f32>> = x
            .par_chunks(ROWS * c)
            .zip(dy.par_chunks(ROWS * c).zip(y.par_chunks(ROWS * c)))
            .map(|(x, (dy, y))| {
                let mut acc = vec![0f32; 2 * c];
                grad_sums(x, dy, y, p, &mut acc);
                acc
            })
            .collect();
        let mut t = vec![0f64; 2 * c];
        for p in parts {
            t.iter_mut().zip(&p).for_each(|(t, &v)| *t += v as f64);
        }
        t
    };
    let dbeta: Vec<f32> = sums[..c].iter().map(|&v| v as f32).collect();
    let dgamma: Vec<f32> = sums[c..].iter().map(|&v| v as f32).collect();
    let k: Vec<f32> = if need_dx {
        (0..c).map(|j| gamma[j] * inv[j] / rows as f32).collect()
    } else {
        Vec::new()
    };
    let dx = need_dx.then(|| {
        (p.k, p.dbeta, p.dgamma) = (&k, &dbeta, &dgamma);
        let p = &p;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(ROWS * c)
            .zip(x.par_chunks(ROWS * c).zip(dy.par_chunks(ROWS * c)))
            .zip(y.par_chunks(ROWS * c))
            .for_each(|((o, (x, dy)), y)| grad_input_rows(x, dy, y, p, o));
        dx
    });
    (dx, dgamma, dbeta)
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "wick-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_f32(s1, l1, "batch norm", "the input")?;
        let gamma = op_f32(s2, l2, "batch norm", "the weight")?;
        let beta = op_f32(s3, l3, "batch norm", "the bias")?;
        let (out, saved) = train_forward(x, gamma, beta, self.eps, self.relu);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("batch norm: backward before forward")
        };
        let x = &x.contiguous()?;
        let dy = &dy.contiguous()?;
        let res = &res.contiguous()?;
        let c = saved.mean.len();
        let g = to_vec(gamma)?;
        let (xs, xl) = x.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (ys, yl) = res.storage_and_layout();
        let (xv, dyv, yv) = match (&*xs, &*ds, &*ys) {
            (
                candle_core::Storage::Cpu(a),
                candle_core::Storage::Cpu(b),
                candle_core::Storage::Cpu(r),
            ) => (
                op_f32(a, xl, "batch norm", "the input")?,
                op_f32(b, dl, "batch norm", "the gradient")?,
                op_f32(r, yl, "batch norm", "the output")?,
            ),
            _ => candle_core::bail!("batch norm: CPU tensors expected"),
        };
        let (dx, dgamma, dbeta) = train_backward(xv, yv, dyv, &saved, &g, self.relu, x.track_op());
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
            .transpose()?;
        let dev = x.device();
        Ok((
            dx,
            Some(Tensor::from_vec(dgamma, c, dev)?),
            Some(Tensor::from_vec(dbeta, c, dev)?),
        ))
    }
}

/// Evaluation-mode forward: `y = x·scale + shift` per channel (last axis).
struct ChannelAffine {
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "wick-channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_f32(s, l, "batch norm", "the input")?;
        let c = self.scale.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS * c)
            .zip(x.par_chunks(ROWS * c))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    for j in 0..c {
                        o[j] = x[j] * self.scale[j] + self.shift[j];
                    }
                    if self.relu {
                        o.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = Tensor::from_slice(&self.scale, self.scale.len(), x.device())?;
        let dy = if self.relu {
            super::act::relu_grad(res, dy)?
        } else {
            dy.clone()
        };
        Ok(Some(dy.broadcast_mul(&s)?))
    }
}

/// A BatchNorm2d layer over NHWC activations. The tensors are the store's variables.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm2d {
    /// Training mode: batch statistics, running statistics updated in place. Frozen layers
    /// (`train = false`) use the running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// As [`Self::forward`], followed by a ReLU when `relu` (one fused pass).
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        if !x.device().is_cpu() {
            let y = self.forward_generic(&x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        if !train {
            let (scale, shift) = self.eval_affine()?;
            let op = ChannelAffine { scale, shift, relu };
            // Keep a graph only for inputs that need a gradient.
            return if x.track_op() {
                x.apply_op1(op)
            } else {
                x.apply_op1_no_bwd(&op)
            };
        }
        let saved = Arc::new(Mutex::new(None));
        let op = BnTrain {
            eps: self.eps as f32,
            relu,
            saved: saved.clone(),
        };
        let y = x.apply_op3(&self.weight, &self.bias, op)?;
        // Running statistics (PyTorch: unbiased variance, momentum-weighted average).
        let c = self.weight.elem_count();
        let Some(Saved { mean, var, .. }) = saved.lock().unwrap_or_else(|e| e.into_inner()).clone()
        else {
            candle_core::bail!("batch norm: the forward pass kept no statistics")
        };
        let rows = x.elem_count() / c.max(1);
        self.track(&mean, &var, rows)?;
        Ok(y)
    }

    /// Folds one training batch's statistics (`rows` values per channel; biased variance)
    /// into the running ones, as PyTorch does: unbiased variance, momentum-weighted average.
    pub(crate) fn track(&self, mean: &[f32], var: &[f32], rows: usize) -> candle_core::Result<()> {
        let unbias = if rows > 1 {
            rows as f32 / (rows - 1) as f32
        } else {
            1.0
        };
        let m = self.momentum as f32;
        update_in_place(&self.running_mean, |rm| {
            rm.iter_mut()
                .zip(mean)
                .for_each(|(r, &v)| *r = (1.0 - m) * *r + m * v)
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        update_in_place(&self.running_var, |rv| {
            rv.iter_mut()
                .zip(var)
                .for_each(|(r, &v)| *r = (1.0 - m) * *r + m * v * unbias)
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        update_in_place(&self.num_batches_tracked, |n| {
            n.iter_mut().for_each(|n| *n += 1.0)
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// `scale = γ / √(running_var + ε)`, `shift = β − running_mean · scale`.
    pub fn eval_affine(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let g = to_vec(&self.weight)?;
        let b = to_vec(&self.bias)?;
        let rm = to_vec(&self.running_mean)?;
        let rv = to_vec(&self.running_var)?;
        let scale: Vec<f32> = (0..g.len())
            .map(|j| g[j] / (rv[j] + self.eps as f32).sqrt())
            .collect();
        let shift = (0..g.len()).map(|j| b[j] - rm[j] * scale[j]).collect();
        Ok((scale, shift))
    }

    /// The same computation with candle ops (non-CPU devices), running statistics included.
    fn forward_generic(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let c = self.weight.elem_count();
        let flat = x.reshape(((), c))?;
        let (mean, var) = if train {
            let mean = flat.mean_keepdim(0)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
            let host = |t: &Tensor| t.detach().flatten_all()?.to_vec1::<f32>();
            self.track(&host(&mean)?, &host(&var)?, flat.dim(0)?)?;
            (mean, var)
        } else {
            (
                self.running_mean.reshape((1, c))?,
                self.running_var.reshape((1, c))?,
            )
        };
        let y = flat
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight.reshape((1, c))?)?
            .broadcast_add(&self.bias.reshape((1, c))?)?;
        y.reshape(x.shape())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn layer(c: usize) -> BatchNorm2d {
        let d = &Device::Cpu;
        BatchNorm2d {
            weight: Tensor::new(&[1.5f32, 0.5, 1.0][..c], d).unwrap(),
            bias: Tensor::new(&[0.1f32, -0.2, 0.0][..c], d).unwrap(),
            running_mean: Tensor::zeros(c, DType::F32, d).unwrap(),
            running_var: Tensor::ones(c, DType::F32, d).unwrap(),
            num_batches_tracked: Tensor::zeros((), DType::F32, d).unwrap(),
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    /// The candle-ops path (what a GPU runs) normalises and tracks running statistics like
    /// the CPU kernel, in training and in evaluation mode.
    #[test]
    fn the_generic_path_matches_the_kernel() {
        let mut rng = crate::rng::Rng::keyed(2, "bn-test", 0);
        let v: Vec<f32> = (0..4 * 5 * 5 * 3).map(|_| rng.next_f32() * 2.0).collect();
        let x = Tensor::from_vec(v, (4, 5, 5, 3), &Device::Cpu).unwrap();
        let (a, b) = (layer(3), layer(3));
        let diff = crate::model::kernels::max_abs_diff;
        for _ in 0..3 {
            let ya = a.forward(&x, true).unwrap();
            let yb = b.forward_generic(&x, true).unwrap();
            assert!(diff(&ya, &yb) < 1e-5);
        }
        assert!(diff(&a.running_mean, &b.running_mean) < 1e-6);
        assert!(diff(&a.running_var, &b.running_var) < 1e-6);
        assert_eq!(
            b.num_batches_tracked.to_scalar::<f32>().unwrap(),
            3.0,
            "batches tracked"
        );
        let (ya, yb) = (
            a.forward(&x, false).unwrap(),
            b.forward_generic(&x, false).unwrap(),
        );
        assert!(diff(&ya, &yb) < 1e-5);
    }
}
