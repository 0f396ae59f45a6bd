//! Layer normalisation over the last dimension as one candle custom op with a backward pass
//! (candle-nn's fused `layer_norm` has none, and its composed version takes six passes).
//! Rows run in parallel; the weight and bias gradients are summed over fixed blocks of rows in
//! order, so the result does not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::op_f32;
use super::vecmath::dispatch;

/// Rows per parallel task (fixed, so sums do not depend on the thread count).
const ROWS: usize = 32;

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dimension of `x`.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let op = LayerNorm { eps: eps as f32 };
    if !x.device().is_cpu() {
        let mean = x.mean_keepdim(candle_core::D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        return xhat.broadcast_mul(weight)?.broadcast_add(bias);
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

struct LayerNorm {
    eps: f32,
}

/// Lanes of the row sums: they vectorise, and their order is fixed (so is the result).
const LANES: usize = 16;

/// `Σ f(v)` over `row`, in [`LANES`] fixed lanes.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// Mean and reciprocal standard deviation of a row.
#[inline(always)]
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let h = row.len() as f32;
    let mean = lane_sum(row, |v| v) / h;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / h;
    (mean, 1.0 / (var + eps).sqrt())
}

// One row of the forward pass (vectorised for the CPU at hand; the same arithmetic in every
// variant, so the same result).
dispatch!(normalize_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, o: &mut [f32]) {
    let (mean, rstd) = stats(x, eps);
    for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
        *o = (x - mean) * rstd * w + b;
    }
});

// [`normalize_row`] with the output over its input (a fused op's row, still in cache).
dispatch!(pub(crate) normalize_in_place(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let (mean, rstd) = stats(x, eps);
    for ((x, &w), &b) in x.iter_mut().zip(w).zip(b) {
        *x = (*x - mean) * rstd * w + b;
    }
});

fn width(l: &Layout, lw: &Layout, lb: &Layout) -> candle_core::Result<usize> {
    let h = *l.dims().last().unwrap_or(&0);
    if h == 0 || lw.shape().elem_count() != h || lb.shape().elem_count() != h {
        candle_core::bail!(
            "layer_norm: input {:?} needs a weight and bias of {h} values, got {:?} and {:?}",
            l.dims(),
            lw.dims(),
            lb.dims()
        );
    }
    Ok(h)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "wick-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = width(lx, lw, lb)?;
        let x = op_f32(sx, lx, "layer_norm", "the input")?;
        let w = op_f32(sw, lw, "layer_norm", "the weight")?;
        let b = op_f32(sb, lb, "layer_norm", "the bias")?;
        let mut out: Vec<f32> = Vec::with_capacity(x.len());
        // SAFETY: every element is written below (rows of `h` cover `x.len()`, `width`
        // checked that `h` divides it) before the tensor is read; zeroing first cost a pass
        // over the output (a memset of 6 MB per layer norm at batch 32 × 128 tokens).
        #[allow(clippy::uninit_vec)]
        unsafe {
            out.set_len(x.len())
        };
        out.par_chunks_mut(h * ROWS)
            .zip(x.par_chunks(h * ROWS))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
                    normalize_row(x, w, b, self.eps, o);
                }
            });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // One op computes all three gradients, packed as [dx | dw | db].
        let h = *x.dims().last().unwrap_or(&0);
        let packed = x.apply_op3_no_bwd(w, &dy, &LayerNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, h)?;
        let db = packed.narrow(0, n + h, h)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "wick-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = width(lx, lw, lw)?;
        let x = op_f32(sx, lx, "layer_norm backward", "the input")?;
        let w = op_f32(sw, lw, "layer_norm backward", "the weight")?;
        let dy = op_f32(sd, ld, "layer_norm backward", "the output gradient")?;
        let n = x.len();
        let mut out = vec![0f32; n + 2 * h];
        let (dx, _) = out.split_at_mut(n);
        // Per block of rows: dx, and partial weight/bias gradients.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(h * ROWS)
            .zip(x.par_chunks(h * ROWS).zip(dy.par_chunks(h * ROWS)))
            .map(|(dx, (x, dy))| {
                let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                let mut g = vec![0f32; h];
                for ((dx, x), dy) in dx
                    .chunks_exact_mut(h)
                    .zip(x.chunks_exact(h))
                    .zip(dy.chunks_exact(h))
                {
                    let (mean, rstd) = stats(x, self.eps);
                    let (mut sg, mut sgx) = (0f32, 0f32);
                    for j in 0..h {
                        let xhat = (x[j] - mean) * rstd;
                        dw[j] += dy[j] * xhat;
                        db[j] += dy[j];
                        g[j] = dy[j] * w[j];
                        sg += g[j];
                        sgx += g[j] * xhat;
                    }
                    let (mg, mgx) = (sg / h as f32, sgx / h as f32);
                    for j in 0..h {
                        let xhat = (x[j] - mean) * rstd;
                        dx[j] = rstd * (g[j] - mg - xhat * mgx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (dw, db) = out[n..].split_at_mut(h);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * h)))
    }
}
