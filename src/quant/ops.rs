//! The int8 layers: linear, convolution (im2col + int8 GEMM) and embedding lookup. They run
//! without autograd (inference only) on the CPU; on other devices they compute the same
//! function from the dequantized weights.

use candle_core::{DType, Tensor};

use super::gemm::{gemm_f32, gemm_f32_rows, gemm_requantize, quantize_rows, Act, QRows, RowPost};
use super::{rel_error, LayerKind, QTensor};
use crate::model::conv::{affine_in_place, conv2d_forward, im2col_i16, ConvSpec};
use crate::model::kernels::cpu_f32;

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
    let after = After {
        act,
        residual,
        ..After::default()
    };
    Ok(linear_with(x, None, q, bias, after)?.0)
}

/// What an int8 layer does after its product, in the same pass over the output: an
/// activation, then `+ residual`, then a layer norm of each row; and it can hand on the
/// output quantized for the next int8 layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct After<'a> {
    pub act: Act,
    /// Added to the output (of the output's shape).
    pub residual: Option<&'a Tensor>,
    /// A layer norm of each output row: weight, bias, epsilon.
    pub norm: Option<(&'a Tensor, &'a Tensor, f64)>,
    /// Also return the output as int8 rows for this layer's input (its static scale, if it
    /// has one), made while each row is in cache.
    pub quantize_for: Option<&'a QTensor>,
}

/// The int8 linear layer `q` on `x` with `after` fused into it: returns the output and, with
/// `after.quantize_for`, the output's int8 rows for that layer. `xq` are `x`'s int8 rows if
/// a fused op already made them (for this layer's scale), else `x` is quantized here.
pub fn linear_with(
    x: &Tensor,
    xq: Option<QRows>,
    q: &QTensor,
    bias: Option<&Tensor>,
    after: After,
) -> candle_core::Result<(Tensor, Option<QRows>)> {
    let (k, shape) = out_shape(x, q)?;
    check_bias(q, bias)?;
    after.check(&q.name, &shape)?;
    if !x.device().is_cpu() || (!fused() && after.extras()) {
        let y = if x.device().is_cpu() {
            let act = After {
                act: after.act,
                ..After::default()
            };
            linear_with(x, xq, q, bias, act)?.0
        } else {
            dequantized(x, q, bias, after.act)?
        };
        return Ok((after.unfused(y)?, None));
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let b = bias.map(f32_vec).transpose()?;
    let (y, yq) = after.run(&x, |xs, r, post| {
        let a = input_rows(xs, xq, m, k, q)?;
        let out = gemm_f32_rows(&a, q.packed(), &q.scale, b.as_deref(), after.act, r, post);
        a.recycle();
        Ok(out)
    })?;
    Ok((Tensor::from_vec(y, shape, x.device())?, yq))
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
    let after = After {
        residual,
        ..After::default()
    };
    Ok(mlp_with(x, None, q1, b1, act, q2, b2, after)?.0)
}

/// [`mlp`] with `after` fused into its second product, and `xq` as in [`linear_with`].
#[allow(clippy::too_many_arguments)]
pub fn mlp_with(
    x: &Tensor,
    xq: Option<QRows>,
    q1: &QTensor,
    b1: Option<&Tensor>,
    act: Act,
    q2: &QTensor,
    b2: Option<&Tensor>,
    after: After,
) -> candle_core::Result<(Tensor, Option<QRows>)> {
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
    let mut shape = hidden.clone();
    *shape.last_mut().expect("rank ≥ 1") = q2.rows();
    check_bias(q1, b1)?;
    check_bias(q2, b2)?;
    after.check(&q2.name, &shape)?;
    if !x.device().is_cpu() || !fused() {
        let after1 = After {
            act,
            ..After::default()
        };
        let h = linear_with(x, xq, q1, b1, after1)?.0;
        return linear_with(&h, None, q2, b2, after);
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let b1 = b1.map(f32_vec).transpose()?;
    let b2 = b2.map(f32_vec).transpose()?;
    let (y, yq) = after.run(&x, |xs, r, post| {
        let a = input_rows(xs, xq, m, k, q1)?;
        let h = gemm_requantize(&a, q1.packed(), &q1.scale, b1.as_deref(), act, q2.act_scale);
        a.recycle();
        let out = gemm_f32_rows(
            &h,
            q2.packed(),
            &q2.scale,
            b2.as_deref(),
            after.act,
            r,
            post,
        );
        h.recycle();
        Ok(out)
    })?;
    Ok((Tensor::from_vec(y, shape, x.device())?, yq))
}

/// An error unless `bias` (if any) has one value per output of `q`.
fn check_bias(q: &QTensor, bias: Option<&Tensor>) -> candle_core::Result<()> {
    match bias {
        Some(b) if b.elem_count() != q.rows() => candle_core::bail!(
            "int8 linear `{}`: a bias of {:?} for {} outputs",
            q.name,
            b.dims(),
            q.rows()
        ),
        _ => Ok(()),
    }
}

/// `x`'s int8 rows for layer `q`: `xq` when given (checked against `x`'s shape), else `x`
/// quantized now.
fn input_rows(
    xs: &[f32],
    xq: Option<QRows>,
    m: usize,
    k: usize,
    q: &QTensor,
) -> candle_core::Result<QRows> {
    match xq {
        Some(a) if a.m == m && a.k == k && a.fixed == q.act_scale => Ok(a),
        Some(a) => candle_core::bail!(
            "int8 linear `{}`: int8 rows [{}, {}] (static scale {:?}) for an input [{m}, {k}] \
             (static scale {:?}); pass the rows made for this layer (`After::quantize_for`)",
            q.name,
            a.m,
            a.k,
            a.fixed,
            q.act_scale
        ),
        None => Ok(quantize_rows(xs, m, k, q.act_scale)),
    }
}

static FUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether [`linear_with`] and [`mlp_with`] fuse their residual, norm and hidden layer (the
/// default); `false` runs them as separate steps, with the same values (for A/B timings).
#[doc(hidden)]
pub fn set_fused(on: bool) {
    FUSED.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn fused() -> bool {
    FUSED.load(std::sync::atomic::Ordering::Relaxed)
}

impl After<'_> {
    /// Whether anything follows the activation.
    fn extras(&self) -> bool {
        self.residual.is_some() || self.norm.is_some() || self.quantize_for.is_some()
    }

    /// Checks the residual's, the norm's and the next layer's shapes against the output's.
    fn check(&self, name: &str, shape: &[usize]) -> candle_core::Result<()> {
        if let Some(r) = self.residual {
            if r.dims() != shape {
                candle_core::bail!(
                    "int8 linear `{name}`: residual {:?} for an output {shape:?}",
                    r.dims()
                );
            }
        }
        let n = shape.last().copied().unwrap_or(0);
        if let Some((w, b, _)) = self.norm {
            if w.elem_count() != n || b.elem_count() != n {
                candle_core::bail!(
                    "int8 linear `{name}`: a layer norm of {:?} and {:?} for rows of {n}",
                    w.dims(),
                    b.dims()
                );
            }
        }
        if let Some(next) = self.quantize_for {
            if next.kind != LayerKind::Linear || next.cols() != n {
                candle_core::bail!(
                    "int8 linear `{name}`: rows of {n} cannot feed `{}` {:?}",
                    next.name,
                    next.shape
                );
            }
        }
        Ok(())
    }

    /// The residual and the norm as separate ops on the product `y` (`act` already applied).
    fn unfused(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let y = match self.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        match self.norm {
            Some((w, b, eps)) => crate::model::layer_norm::layer_norm(&y, w, b, eps),
            None => Ok(y),
        }
    }

    /// `f(x, residual, post)` on the f32 values of `x`, the residual and the norm.
    fn run(
        &self,
        x: &Tensor,
        f: impl FnOnce(
            &[f32],
            Option<&[f32]>,
            RowPost,
        ) -> candle_core::Result<(Vec<f32>, Option<QRows>)>,
    ) -> candle_core::Result<(Vec<f32>, Option<QRows>)> {
        let norm = self
            .norm
            .map(|(w, b, eps)| Ok::<_, candle_core::Error>((f32_vec(w)?, f32_vec(b)?, eps as f32)))
            .transpose()?;
        let post = RowPost {
            norm: norm
                .as_ref()
                .map(|(w, b, eps)| (w.as_slice(), b.as_slice(), *eps)),
            quantize: self.quantize_for.map(|q| q.act_scale),
        };
        on_f32_with(x, self.residual, |xs, r| f(xs, r, post))?
    }
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
fn on_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (s, l) = x.storage_and_layout();
    if let Some(v) = cpu_f32(&s, l) {
        return Ok(f(v));
    }
    drop(s);
    Ok(f(&f32_vec(x)?))
}

/// `f` on the values of `x` (contiguous) and of `other` (any layout), each borrowed when it
/// is f32 on the CPU, else a converted copy.
fn on_f32_with<R>(
    x: &Tensor,
    other: Option<&Tensor>,
    f: impl FnOnce(&[f32], Option<&[f32]>) -> R,
) -> candle_core::Result<R> {
    let Some(o) = other else {
        return on_f32(x, |xs| f(xs, None));
    };
    let o = o.contiguous()?;
    let (s, l) = o.storage_and_layout();
    if let Some(os) = cpu_f32(&s, l) {
        return on_f32(x, |xs| f(xs, Some(os)));
    }
    drop(s);
    let os = f32_vec(&o)?;
    on_f32(x, |xs| f(xs, Some(&os)))
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
        fixed: image.fixed,
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
