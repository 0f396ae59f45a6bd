//! The int8 layers: linear, convolution (im2col + int8 GEMM) and embedding lookup. They run
//! without autograd (inference only) on the CPU; on other devices they compute the same
//! function from the dequantized weights.

use candle_core::{DType, Tensor};

use super::gemm::{gemm_f32, gemm_f32_act, quantize_rows, Act, QRows};
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
    if !x.device().is_cpu() {
        let w = Tensor::from_vec(q.dequantize(), (q.rows(), k), x.device())?;
        let y = x.broadcast_matmul(&w.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        return match act {
            Act::Gelu => crate::model::act::gelu(&y),
            Act::None => Ok(y),
        };
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let b = bias.map(f32_vec).transpose()?;
    let y = on_f32(&x, |xs| {
        let a = quantize_rows(xs, m, k, q.act_scale);
        let y = gemm_f32_act(&a, q.packed(), &q.scale, b.as_deref(), act);
        a.recycle();
        y
    })?;
    Tensor::from_vec(y, shape, x.device())
}

/// `f` on the values of `x` (contiguous): in place when they are f32 on the CPU, else on a
/// converted copy.
fn on_f32<R>(x: &Tensor, f: impl Fn(&[f32]) -> R) -> candle_core::Result<R> {
    match with_f32(x, &f) {
        Some(r) => Ok(r),
        None => Ok(f(&f32_vec(x)?)),
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
