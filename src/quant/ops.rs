//! The int8 layers: linear, convolution (im2col + int8 GEMM) and embedding lookup. They run
//! without autograd (inference only) on the CPU; on other devices they compute the same
//! function from the dequantized weights.

use candle_core::{DType, Tensor};

use super::gemm::{gemm_f32, gemm_f32_fused, gemm_requantize, quantize_rows, Act, QRows};
use super::{rel_error, LayerKind, QTensor};
use crate::model::conv::{affine_in_place, conv2d_forward, im2col_i16, ConvSpec};
use crate::model::kernels::with_f32;

fn f32_vec(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// The layer whose weight is `wname` in `store`, applied to `x`: the int8 linear kernel once
/// the weight is quantized, else `f32` (with `x` recorded while calibrating). Models call it
/// for each quantizable linear layer.
pub fn linear_or(
    store: &crate::model::ParamStore,
    wname: &str,
    x: &Tensor,
    bias: Option<&Tensor>,
    f32: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if let Some(q) = store.quantized(wname) {
        return linear(x, &q, bias);
    }
    store.observe(wname, x)?;
    f32()
}

/// `x·Wᵀ + b` over the last dimension of `x` with int8 weights `q` (`[out, in]`).
pub fn linear(x: &Tensor, q: &QTensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    linear_act(x, q, bias, Act::None)
}

/// [`linear`] followed by an activation, fused into the GEMM's epilogue.
pub fn linear_act(
    x: &Tensor,
    q: &QTensor,
    bias: Option<&Tensor>,
    act: Act,
) -> candle_core::Result<Tensor> {
    linear_fused(x, q, bias, act, None)
}

/// `act(x·Wᵀ + b) + residual` with int8 weights `q`, the activation and the skip connection
/// in the GEMM's epilogue (`residual` has the output's shape).
pub fn linear_fused(
    x: &Tensor,
    q: &QTensor,
    bias: Option<&Tensor>,
    act: Act,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (k, shape) = out_shape(x, q)?;
    if let Some(r) = residual {
        if r.dims() != shape.as_slice() {
            candle_core::bail!(
                "int8 linear `{}`: residual {:?} for an output {shape:?}",
                q.name,
                r.dims()
            );
        }
    }
    if !x.device().is_cpu() {
        let y = dequantized(x, q, bias, act)?;
        return match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
    }
    if let (false, Some(r)) = (fused(), residual) {
        return linear_fused(x, q, bias, act, None)? + r;
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let b = bias.map(f32_vec).transpose()?;
    let y = on_f32_with(&x, residual, |xs, r| {
        let a = quantize_rows(xs, m, k, q.act_scale);
        let y = gemm_f32_fused(&a, q.packed(), &q.scale, b.as_deref(), act, r);
        a.recycle();
        y
    })?;
    Tensor::from_vec(y, shape, x.device())
}

static FUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether [`linear_fused`] and [`mlp`] fuse their residual and hidden layer (the default);
/// `false` runs them as separate steps, with the same values (for A/B timings).
#[doc(hidden)]
pub fn set_fused(on: bool) {
    FUSED.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn fused() -> bool {
    FUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Two int8 linear layers, `act(x·W1ᵀ + b1)·W2ᵀ + b2 (+ residual)` (a transformer's
/// feed-forward block): the hidden layer goes from the first product's epilogue straight to
/// the second's int8 input, a block of rows at a time, and is never written out in f32. The
/// same values as [`linear_act`] then [`linear_fused`].
#[allow(clippy::too_many_arguments)]
pub fn mlp(
    x: &Tensor,
    q1: &QTensor,
    b1: Option<&Tensor>,
    act: Act,
    q2: &QTensor,
    b2: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (k, hidden) = out_shape(x, q1)?;
    if q2.kind != LayerKind::Linear || q2.cols() != q1.rows() {
        candle_core::bail!(
            "int8 mlp: `{}` gives {} values, `{}` takes {:?}",
            q1.name,
            q1.rows(),
            q2.name,
            q2.shape
        );
    }
    if !x.device().is_cpu() {
        let h = dequantized(x, q1, b1, act)?;
        return linear_fused(&h.reshape(hidden)?, q2, b2, Act::None, residual);
    }
    let mut shape = hidden.clone();
    *shape.last_mut().expect("rank ≥ 1") = q2.rows();
    if let Some(r) = residual {
        if r.dims() != shape.as_slice() {
            candle_core::bail!(
                "int8 mlp `{}`: residual {:?} for an output {shape:?}",
                q2.name,
                r.dims()
            );
        }
    }
    if !fused() {
        let h = linear_act(x, q1, b1, act)?;
        return linear_fused(&h, q2, b2, Act::None, residual);
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let b1 = b1.map(f32_vec).transpose()?;
    let b2 = b2.map(f32_vec).transpose()?;
    let y = on_f32_with(&x, residual, |xs, r| {
        let a = quantize_rows(xs, m, k, q1.act_scale);
        let h = gemm_requantize(&a, q1.packed(), &q1.scale, b1.as_deref(), act, q2.act_scale);
        a.recycle();
        let y = gemm_f32_fused(&h, q2.packed(), &q2.scale, b2.as_deref(), Act::None, r);
        h.recycle();
        y
    })?;
    Tensor::from_vec(y, shape, x.device())
}

/// The input width of linear layer `q` and its output's shape for input `x`, or an error
/// when `x`'s last dimension is not the layer's width.
fn out_shape(x: &Tensor, q: &QTensor) -> candle_core::Result<(usize, Vec<usize>)> {
    let k = *x.dims().last().unwrap_or(&1);
    if q.kind != LayerKind::Linear || q.cols() != k {
        candle_core::bail!(
            "int8 linear `{}`: input width {k}, weights {:?}",
            q.name,
            q.shape
        );
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank ≥ 1") = q.rows();
    Ok((k, shape))
}

/// The layer on a device other than the CPU: the same function from the dequantized weights.
fn dequantized(
    x: &Tensor,
    q: &QTensor,
    bias: Option<&Tensor>,
    act: Act,
) -> candle_core::Result<Tensor> {
    let w = Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), x.device())?;
    let y = x.broadcast_matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    match act {
        Act::Gelu => crate::model::act::gelu(&y),
        Act::None => Ok(y),
    }
}

/// `f` on the values of `x` (contiguous): in place when they are f32 on the CPU, else on a
/// converted copy.
fn on_f32<R>(x: &Tensor, f: impl Fn(&[f32]) -> R) -> candle_core::Result<R> {
    match with_f32(x, &f) {
        Some(r) => Ok(r),
        None => Ok(f(&f32_vec(x)?)),
    }
}

/// `f` on the values of `x` (contiguous) and of `other` (any layout), each borrowed when it
/// is f32 on the CPU, else a converted copy.
fn on_f32_with<R>(
    x: &Tensor,
    other: Option<&Tensor>,
    f: impl Fn(&[f32], Option<&[f32]>) -> R,
) -> candle_core::Result<R> {
    let Some(o) = other else {
        return on_f32(x, |xs| f(xs, None));
    };
    let o = o.contiguous()?;
    match with_f32(&o, |os| on_f32(x, |xs| f(xs, Some(os)))) {
        Some(r) => r,
        None => {
            let os = f32_vec(&o)?;
            on_f32(x, |xs| f(xs, Some(&os)))
        }
    }
}

/// Convolution of NHWC `x` with int8 weights `q` (`[out, in, kh, kw]`), then
/// `max(y·scale + shift, 0)` per output channel (the affine map of an evaluation-mode
/// BatchNorm, if given; the ReLU with `relu`).
pub fn conv2d(
    x: &Tensor,
    q: &QTensor,
    spec: ConvSpec,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
) -> candle_core::Result<Tensor> {
    if q.kind != LayerKind::Conv2d {
        candle_core::bail!("int8 conv2d `{}`: not a convolution weight", q.name);
    }
    let x = x.contiguous()?;
    let (mut y, shape) = on_f32(&x, |xv| conv_raw(q, xv, x.dims(), spec))??;
    let c = shape[3];
    match affine {
        Some((scale, shift)) => affine_in_place(&mut y, c, scale, shift, relu),
        None if relu => y.iter_mut().for_each(|v| *v = v.max(0.0)),
        None => {}
    }
    Tensor::from_vec(y, shape.to_vec(), x.device())
}

/// The convolution's f32 output (before any affine map): each image's activations quantized
/// by the image's own range (dynamic) or the calibrated one (static), im2col on the int8
/// values, then the int8 GEMM.
fn conv_raw(
    q: &QTensor,
    x: &[f32],
    xs: &[usize],
    spec: ConvSpec,
) -> candle_core::Result<(Vec<f32>, [usize; 4])> {
    let &[n, h, w, c] = xs else {
        candle_core::bail!("int8 conv2d `{}`: expected NHWC input, got {xs:?}", q.name)
    };
    let per = h * w * c;
    // One range per image: an im2col row is a patch of one image, and quantizing the image
    // once costs a ninth of quantizing the (3×3) im2col matrix.
    let image = quantize_rows(x, n, per, q.act_scale);
    let xq: Vec<i16> = if per % 2 == 0 {
        image.q
    } else {
        image
            .q
            .chunks_exact(per + 1)
            .flat_map(|r| r[..per].iter().copied())
            .collect()
    };
    let (col, shape, _) = im2col_i16(&xq, xs, &q.shape, spec)?;
    let rows = shape[1] * shape[2];
    let a = QRows {
        m: shape[0] * rows,
        k: q.cols(),
        q: col,
        scale: (0..shape[0] * rows)
            .map(|r| image.scale[r / rows])
            .collect(),
    };
    Ok((gemm_f32(&a, q.packed(), &q.scale, None), shape))
}

/// Rows `ids` of an int8 embedding table `q` (`[rows, dim]`), dequantized: `[ids, dim]` for
/// the flattened ids.
pub fn embedding(ids: &Tensor, q: &QTensor) -> candle_core::Result<Tensor> {
    let device = ids.device().clone();
    let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let dim = q.cols();
    let mut out = vec![0f32; ids.len() * dim];
    for (dst, &id) in out.chunks_exact_mut(dim.max(1)).zip(&ids) {
        let id = id as usize;
        if id >= q.rows() {
            candle_core::bail!(
                "embedding `{}`: token id {id} is outside the table of {} rows",
                q.name,
                q.rows()
            );
        }
        let s = q.scale[id];
        for (d, &v) in dst.iter_mut().zip(&q.q[id * dim..(id + 1) * dim]) {
            *d = v as f32 * s;
        }
    }
    Tensor::from_vec(out, (ids.len(), dim), &device)
}

/// The relative L2 error of layer `q`'s int8 output against its f32 output (weights `w`) on
/// the recorded input `x` (`dims`).
pub(super) fn output_error(
    q: &QTensor,
    w: &[f32],
    x: &[f32],
    dims: &[usize],
    conv: Option<ConvSpec>,
) -> crate::Result<f32> {
    match q.kind {
        LayerKind::Conv2d => {
            let spec = conv.unwrap_or_default();
            let (want, _) = conv2d_forward(x, dims, w, &q.shape, spec)?;
            let (got, _) = conv_raw(q, x, dims, spec)?;
            Ok(rel_error(&want, &got))
        }
        _ => {
            let (m, k) = (dims[0], dims[1]);
            let n = q.rows();
            let mut want = vec![0f32; m * n];
            crate::model::kernels::gemm_tiled(m, n, k, &mut want, n, false, x, k, 1, w, 1, k);
            let a = quantize_rows(x, m, k, q.act_scale);
            let got = gemm_f32(&a, q.packed(), &q.scale, None);
            Ok(rel_error(&want, &got))
        }
    }
}
