//! A fully connected layer `y = x·Wᵀ + b` as one candle custom op, with PyTorch's weight
//! layout (`[out, in]`). Forward and both gradients run on [`gemm_tiled`], which splits
//! products with few rows (a batch of one sequence) by columns so that every core works, and
//! whose result does not depend on the thread count. The bias gradient is a column sum in a
//! fixed order.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{gemm_tiled, op_f32};

/// `x·Wᵀ + b` over the last dimension of `x` (any leading shape).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.broadcast_matmul(&w.t()?)?.broadcast_add(b);
    }
    // candle records the op for backward only when an input tracks gradients.
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

struct Linear;

/// `(rows, in, out)` of a linear op, checked.
fn dims(lx: &Layout, lw: &Layout, lb: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (&k, _) = lx
        .dims()
        .split_last()
        .ok_or_else(|| candle_core::Error::Msg("linear: the input is a scalar".into()))?;
    let (n, kw) = lw.shape().dims2()?;
    if kw != k || lb.shape().elem_count() != n {
        candle_core::bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (weight is [out, in])",
            lx.dims(),
            lw.dims(),
            lb.dims()
        );
    }
    Ok((lx.shape().elem_count() / k.max(1), k, n))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "wick-linear"
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
        let (m, k, n) = dims(lx, lw, lb)?;
        let x = op_f32(sx, lx, "linear", "the input")?;
        let w = op_f32(sw, lw, "linear", "the weight")?;
        let b = op_f32(sb, lb, "linear", "the bias")?;
        // Every row starts as the bias (one write pass; the product is accumulated onto it).
        let mut out = Vec::with_capacity(m * n);
        for _ in 0..m {
            out.extend_from_slice(b);
        }
        gemm_tiled(m, n, k, &mut out, n, true, x, k, 1, w, 1, k);
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
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
        let dx = x
            .track_op()
            .then(|| dy.apply_op2_no_bwd(w, &InputGrad))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| dy.apply_op2_no_bwd(x, &WeightGrad))
            .transpose()?;
        let db = Some(dy.apply_op1_no_bwd(&BiasGrad)?);
        Ok((dx, dw, db))
    }
}

/// `dx = dy·W`.
struct InputGrad;

impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "wick-linear-dx"
    }

    fn cpu_fwd(
        &self,
        sd: &CpuStorage,
        ld: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = op_f32(sd, ld, "linear backward", "the output gradient")?;
        let w = op_f32(sw, lw, "linear backward", "the weight")?;
        let (n, k) = lw.shape().dims2()?;
        let m = dy.len() / n.max(1);
        let mut dx = vec![0f32; m * k];
        gemm_tiled(m, k, n, &mut dx, k, false, dy, n, 1, w, k, 1);
        let mut shape = ld.dims().to_vec();
        *shape.last_mut().expect("rank ≥ 1") = k;
        Ok((CpuStorage::F32(dx), Shape::from(shape)))
    }
}

/// `dW = dyᵀ·x`.
struct WeightGrad;

impl candle_core::CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "wick-linear-dw"
    }

    fn cpu_fwd(
        &self,
        sd: &CpuStorage,
        ld: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = op_f32(sd, ld, "linear backward", "the output gradient")?;
        let x = op_f32(sx, lx, "linear backward", "the input")?;
        let n = *ld.dims().last().expect("rank ≥ 1");
        let k = *lx.dims().last().expect("rank ≥ 1");
        let m = dy.len() / n.max(1);
        let mut dw = vec![0f32; n * k];
        gemm_tiled(n, k, m, &mut dw, k, false, dy, 1, n, x, k, 1);
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}

/// `db = Σ_rows dy`, column blocks in parallel, rows in order.
struct BiasGrad;

impl candle_core::CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "wick-linear-db"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = op_f32(s, l, "linear backward", "the output gradient")?;
        let n = *l.dims().last().expect("rank ≥ 1");
        Ok((CpuStorage::F32(column_sums(dy, n)), Shape::from(n)))
    }
}

/// Column sums of a row-major `[rows, n]` matrix, accumulated row by row in order (so the
/// result does not depend on the thread count).
pub fn column_sums(a: &[f32], n: usize) -> Vec<f32> {
    const COLS: usize = 64;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(COLS).enumerate().for_each(|(c, o)| {
        let (j0, w) = (c * COLS, o.len());
        for row in a.chunks_exact(n) {
            for (o, v) in o.iter_mut().zip(&row[j0..j0 + w]) {
                *o += v;
            }
        }
    });
    out
}
