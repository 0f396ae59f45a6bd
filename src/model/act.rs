//! Activations as single-pass candle custom ops: candle's own ReLU backward builds a mask, a
//! cast and a product (three passes and three allocations).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::op_f32;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// An element-wise op over one input, in parallel chunks: `f(input chunk, output chunk)`.
fn map1(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = op_f32(s, l, op, "the input")?;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| f(x, o));
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

/// An element-wise op over two inputs of the same size: `f(a chunk, b chunk, output chunk)`.
fn map2(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    op: &str,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, b) = (
        op_f32(s1, l1, op, "the first input")?,
        op_f32(s2, l2, op, "the second input")?,
    );
    if a.len() != b.len() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| f(a, b, o));
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// `dy · [y > 0]` for the output `y` of a ReLU.
pub fn relu_grad(y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &ReluGrad)
}

struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "wick-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2((s1, l1), (s2, l2), "relu backward", |y, dy, o| {
            for ((o, &y), &d) in o.iter_mut().zip(y).zip(dy) {
                *o = if y > 0.0 { d } else { 0.0 };
            }
        })
    }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "wick-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map1(s, l, "relu", |x, o| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x.max(0.0);
            }
        })
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(relu_grad(res, dy)?))
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "wick-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2((s1, l1), (s2, l2), "add-relu", |a, b, o| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = (a + b).max(0.0);
            }
        })
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_grad(res, dy)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `max(x, 0)`.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

/// `max(a + b, 0)`, the end of a residual block.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !a.device().is_cpu() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// The exact GELU, `x · Φ(x)` (`Φ` the normal CDF, through erf), as PyTorch's default
/// `gelu` and BERT's `hidden_act = "gelu"`: one vectorised pass forward and one backward.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "wick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        map1(s, l, "gelu", super::vecmath::gelu)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluGrad)?))
    }
}

struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "wick-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2(
            (s1, l1),
            (s2, l2),
            "gelu backward",
            super::vecmath::gelu_grad,
        )
    }
}
