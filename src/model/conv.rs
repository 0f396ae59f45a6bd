//! 2-D convolution as candle custom ops, on NHWC activations with PyTorch-layout weights
//! (`[out, in / groups, kh, kw]`).
//!
//! candle's CPU convolution backward goes through a slow direct transposed convolution. Here,
//! on CPUs with AVX-512, ungrouped convolutions with a multiple of 32 output channels run
//! forward through wick's direct kernel ([`super::conv_direct`]: no im2col matrix, BatchNorm
//! and ReLU fused when frozen), and so do the input gradients of such stride-1 convolutions
//! with enough output pixels. Everything else is one GEMM per group through [`gemm_tiled`]:
//! - forward: `im2col(x)[P, K] · Wᵀ` gives the output directly in NHWC (`P = N·Ho·Wo` rows);
//! - input gradient: `dY · W` gives the column gradient, which `col2im` scatters back;
//! - weight gradient: `dYᵀ · im2col(x)`.
//!
//! Columns are ordered `(ki, kj, channel)` so that im2col copies whole channel runs; the weights
//! are permuted to match once per call. A 1×1 convolution with stride 1 needs no im2col at all.
//! Every result is independent of the thread count (fixed tiles, per-image scatter).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv_direct::{self, Epilogue, PackedWeight};
use super::kernels::op_f32;
use super::kernels::{add_into, gemm_tiled};

/// Stride, zero padding, dilation and groups of a convolution (the same along both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for ConvSpec {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

impl ConvSpec {
    /// Output length along an axis of length `i` for a kernel of size `k`, if any.
    pub fn out_size(&self, i: usize, k: usize) -> Option<usize> {
        let span = self.dilation * (k.max(1) - 1) + 1;
        (i + 2 * self.padding)
            .checked_sub(span)
            .map(|v| v / self.stride.max(1) + 1)
    }
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c: usize,
    pub(crate) cout: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    pub(crate) s: ConvSpec,
    /// Always order im2col columns `(ki, kj, channel)` (int8 inference packs its weights so).
    pub(crate) force_inner: bool,
}

impl Geom {
    pub(crate) fn new(x: &[usize], wt: &[usize], s: ConvSpec) -> candle_core::Result<Self> {
        let (&[n, h, w, c], &[cout, cin_g, kh, kw]) = (x, wt) else {
            candle_core::bail!("conv2d: expected x [n, h, w, c] and weight [out, in/groups, kh, kw], got {x:?} and {wt:?}")
        };
        let g = s.groups.max(1);
        if c != cin_g * g || cout % g != 0 || s.stride == 0 || s.dilation == 0 {
            candle_core::bail!(
                "conv2d: {c} input channels, weight {wt:?}, groups {g}, stride {}, dilation {} do not fit",
                s.stride,
                s.dilation
            );
        }
        let (Some(ho), Some(wo)) = (s.out_size(h, kh), s.out_size(w, kw)) else {
            candle_core::bail!("conv2d: input {h}x{w} is smaller than the {kh}x{kw} kernel")
        };
        Ok(Self {
            n,
            h,
            w,
            c,
            cout,
            kh,
            kw,
            ho,
            wo,
            s,
            force_inner: false,
        })
    }
    pub(crate) fn groups(&self) -> usize {
        self.s.groups.max(1)
    }
    fn cin_g(&self) -> usize {
        self.c / self.groups()
    }
    fn cout_g(&self) -> usize {
        self.cout / self.groups()
    }
    /// Columns of the im2col matrix of one group.
    pub(crate) fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }
    /// Output pixels of the batch (rows of the im2col matrix).
    pub(crate) fn p(&self) -> usize {
        self.n * self.ho * self.wo
    }
    /// A 1×1, stride-1, unpadded, ungrouped convolution is a plain matrix product.
    fn pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.s.stride == 1
            && self.s.padding == 0
            && self.groups() == 1
    }
    /// Whether im2col columns are ordered `(ki, kj, channel)` (whole channel runs copied, the
    /// weight permuted to match) rather than `(channel, ki, kj)` (the weight as it is). The
    /// first pays when the im2col matrix is much larger than the weight: early layers, where
    /// permuting a small weight costs less than scattering the columns.
    fn channel_inner(&self) -> bool {
        self.groups() == 1 && (self.force_inner || self.p() > 4 * self.cout)
    }
    /// Input row `oh·stride + ki·dilation − padding`, if inside the image.
    fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        let i = (o * self.s.stride + k * self.s.dilation) as isize - self.s.padding as isize;
        (i >= 0 && (i as usize) < len).then_some(i as usize)
    }
    /// Whether the direct kernel takes this convolution.
    fn direct(&self) -> bool {
        conv_direct::supported(self)
    }
}

/// A vector of `n` values that the caller overwrites completely before reading.
fn scratch(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and every caller writes all `n` values before
    // any is read (im2col fills every column, padding included; GEMMs with `accumulate =
    // false` write their whole output).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

thread_local! {
    /// The im2col / column-gradient buffer, kept between calls: a fresh multi-megabyte
    /// allocation costs a page fault per 4 KiB, more than filling it.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a reused buffer of at least `n` values (contents unspecified).
fn with_cols<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    COLS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < n {
            *c = scratch(n);
        }
        f(&mut c[..n])
    })
}

/// The im2col matrix `[P, K]` of group `gi`, columns in the order [`Geom::channel_inner`]
/// picks.
fn im2col(x: &[f32], g: &Geom, gi: usize, col: &mut [f32]) {
    im2col_strided(x, g, gi, col, g.k());
}

/// [`im2col`] of any element type, with rows `stride ≥ K` apart (the gap zero-filled).
fn im2col_strided<T: Copy + Default + Send + Sync>(
    x: &[T],
    g: &Geom,
    gi: usize,
    col: &mut [T],
    stride: usize,
) {
    let (k, cg, kk) = (g.k(), g.cin_g(), g.kh * g.kw);
    let c0 = gi * cg;
    let inner = g.channel_inner();
    let zero = T::default();
    col.par_chunks_mut(g.wo * stride)
        .enumerate()
        .for_each(|(row, out)| {
            let (n, oh) = (row / g.ho, row % g.ho);
            for ow in 0..g.wo {
                let dst = &mut out[ow * stride..(ow + 1) * stride];
                dst[k..].fill(zero);
                let dst = &mut dst[..k];
                for ki in 0..g.kh {
                    let ih = g.src(oh, ki, g.h);
                    for kj in 0..g.kw {
                        let at = ki * g.kw + kj;
                        let src = match (ih, g.src(ow, kj, g.w)) {
                            (Some(ih), Some(iw)) => {
                                Some(&x[((n * g.h + ih) * g.w + iw) * g.c + c0..][..cg])
                            }
                            _ => None,
                        };
                        match (src, inner) {
                            (Some(src), true) => dst[at * cg..][..cg].copy_from_slice(src),
                            (None, true) => dst[at * cg..][..cg].fill(zero),
                            (Some(src), false) => {
                                for (c, &v) in src.iter().enumerate() {
                                    dst[c * kk + at] = v;
                                }
                            }
                            (None, false) => (0..cg).for_each(|c| dst[c * kk + at] = zero),
                        }
                    }
                }
            }
        });
}

/// The im2col matrix of int8 activations (as i16) for an ungrouped convolution: columns
/// `(ki, kj, channel)`, rows padded to an even width (the int8 GEMM's pair layout). Returns
/// the matrix, the NHWC output shape and the padded row width.
pub fn im2col_i16(
    x: &[i16],
    xs: &[usize],
    ws: &[usize],
    s: ConvSpec,
) -> candle_core::Result<(Vec<i16>, [usize; 4], usize)> {
    let mut g = Geom::new(xs, ws, s)?;
    if g.groups() != 1 {
        candle_core::bail!(
            "conv2d: int8 convolutions take groups = 1, not {}",
            g.groups()
        );
    }
    g.force_inner = true;
    let shape = [g.n, g.ho, g.wo, g.cout];
    let kp = g.k().next_multiple_of(2);
    if g.pointwise() && kp == g.k() {
        return Ok((x.to_vec(), shape, kp));
    }
    let mut col = vec![0i16; g.p() * kp];
    im2col_strided(x, &g, 0, &mut col, kp);
    Ok((col, shape, kp))
}

/// `[out, in, kh, kw]` → `[out, kh, kw, in]` (the `(ki, kj, channel)` column order), or back
/// with `inverse`.
fn permute_weight(w: &[f32], g: &Geom, inverse: bool) -> Vec<f32> {
    let (ci, kk) = (g.cin_g(), g.kh * g.kw);
    let mut out = vec![0f32; w.len()];
    for (src, dst) in w.chunks_exact(ci * kk).zip(out.chunks_exact_mut(ci * kk)) {
        for c in 0..ci {
            for k in 0..kk {
                if inverse {
                    dst[c * kk + k] = src[k * ci + c];
                } else {
                    dst[k * ci + c] = src[c * kk + k];
                }
            }
        }
    }
    out
}

/// A weight gradient computed in the column order of [`im2col`], in PyTorch's layout.
fn weight_from_cols(dw: Vec<f32>, g: &Geom) -> Vec<f32> {
    if g.channel_inner() {
        permute_weight(&dw, g, true)
    } else {
        dw
    }
}

/// The weight in the column order of [`im2col`].
fn weight_for_cols<'a>(w: &'a [f32], g: &Geom) -> std::borrow::Cow<'a, [f32]> {
    if g.channel_inner() {
        std::borrow::Cow::Owned(permute_weight(w, g, false))
    } else {
        std::borrow::Cow::Borrowed(w)
    }
}

/// Adds the column gradient `[P, K]` of group `gi` into `dx` (NHWC), one image per task.
fn col2im_add(dcol: &[f32], g: &Geom, gi: usize, dx: &mut [f32]) {
    let (k, cg, kk) = (g.k(), g.cin_g(), g.kh * g.kw);
    let c0 = gi * cg;
    let rows = g.ho * g.wo;
    let inner = g.channel_inner();
    dx.par_chunks_mut(g.h * g.w * g.c)
        .enumerate()
        .for_each(|(n, img)| {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let src = &dcol[(n * rows + oh * g.wo + ow) * k..][..k];
                    for ki in 0..g.kh {
                        let Some(ih) = g.src(oh, ki, g.h) else {
                            continue;
                        };
                        for kj in 0..g.kw {
                            let Some(iw) = g.src(ow, kj, g.w) else {
                                continue;
                            };
                            let at = ki * g.kw + kj;
                            let d = &mut img[(ih * g.w + iw) * g.c + c0..][..cg];
                            if inner {
                                let s = &src[at * cg..][..cg];
                                d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                            } else {
                                for (c, d) in d.iter_mut().enumerate() {
                                    *d += src[c * kk + at];
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// Forward convolution: `x` NHWC, weight `[out, in/groups, kh, kw]` → NHWC output.
pub fn conv2d_forward(
    x: &[f32],
    xs: &[usize],
    w: &[f32],
    ws: &[usize],
    s: ConvSpec,
) -> candle_core::Result<(Vec<f32>, [usize; 4])> {
    conv2d_forward_keep(x, xs, w, ws, s, None)
}

/// The im2col matrix a forward pass keeps for the weight gradient (ungrouped convolutions).
type Cols = Arc<Mutex<Option<Vec<f32>>>>;

/// Largest im2col matrix kept between the forward and backward passes (values).
const KEEP_COLS_MAX: usize = 32 << 20;

fn conv2d_forward_keep(
    x: &[f32],
    xs: &[usize],
    w: &[f32],
    ws: &[usize],
    s: ConvSpec,
    keep: Option<&Cols>,
) -> candle_core::Result<(Vec<f32>, [usize; 4])> {
    let g = Geom::new(xs, ws, s)?;
    // The direct kernel needs no im2col matrix; the weight gradient then builds its own.
    if conv_direct::weight_rows_cheaper(&g) && w.len() == g.cout * g.k() {
        let out = conv_direct::forward_by_weight_rows(x, w, &g);
        return Ok((out, [g.n, g.ho, g.wo, g.cout]));
    }
    if let Some(pw) = PackedWeight::new(w, [g.cout, g.c, g.kh, g.kw]).filter(|_| g.direct()) {
        let out = conv_direct::forward(x, &pw, &g, &Epilogue::NONE);
        return Ok((out, [g.n, g.ho, g.wo, g.cout]));
    }
    let (p, k, cog) = (g.p(), g.k(), g.cout_g());
    let wr = weight_for_cols(w, &g);
    let mut out = scratch(p * g.cout);
    if g.pointwise() {
        gemm_tiled(
            p, g.cout, g.c, &mut out, g.cout, false, x, g.c, 1, &wr, 1, g.c,
        );
        return Ok((out, [g.n, g.ho, g.wo, g.cout]));
    }
    let mut run = |col: &mut [f32]| {
        for gi in 0..g.groups() {
            im2col(x, &g, gi, col);
            gemm_tiled(
                p,
                cog,
                k,
                &mut out[gi * cog..],
                g.cout,
                false,
                col,
                k,
                1,
                &wr[gi * cog * k..],
                1,
                k,
            );
        }
    };
    // The weight gradient reuses the matrix (ungrouped convolutions of bounded size).
    match keep.filter(|_| g.groups() == 1 && p * k <= KEEP_COLS_MAX) {
        Some(keep) => {
            let mut col = scratch(p * k);
            run(&mut col);
            *keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(col);
        }
        None => with_cols(p * k, run),
    }
    Ok((out, [g.n, g.ho, g.wo, g.cout]))
}

/// Gradient of the input: `dy` NHWC `[n, ho, wo, out]` → `[n, h, w, c]` (`xs`).
pub fn conv2d_backward_input(
    dy: &[f32],
    xs: &[usize],
    w: &[f32],
    ws: &[usize],
    s: ConvSpec,
) -> candle_core::Result<Vec<f32>> {
    let g = Geom::new(xs, ws, s)?;
    if let Some(dx) = input_grad_direct(dy, w, &g) {
        return Ok(dx);
    }
    let (p, k, cog) = (g.p(), g.k(), g.cout_g());
    let wr = weight_for_cols(w, &g);
    if g.pointwise() {
        let mut dx = scratch(g.n * g.h * g.w * g.c);
        gemm_tiled(
            p, g.c, g.cout, &mut dx, g.c, false, dy, g.cout, 1, &wr, g.c, 1,
        );
        return Ok(dx);
    }
    let mut dx = vec![0f32; g.n * g.h * g.w * g.c];
    {
        with_cols(p * k, |dcol| {
            for gi in 0..g.groups() {
                gemm_tiled(
                    p,
                    k,
                    cog,
                    dcol,
                    k,
                    false,
                    &dy[gi * cog..],
                    g.cout,
                    1,
                    &wr[gi * cog * k..],
                    k,
                    1,
                );
                col2im_add(dcol, &g, gi, &mut dx);
            }
        });
    }
    Ok(dx)
}

/// The input gradient of a stride-1 convolution through the direct kernel, if it takes it:
/// the convolution of `dy`, padded by `dilation·(k − 1) − padding`, with the weight transposed
/// and flipped.
fn input_grad_direct(dy: &[f32], w: &[f32], g: &Geom) -> Option<Vec<f32>> {
    let s = g.s;
    let span = s.dilation * (g.kh.max(g.kw) - 1);
    // Below about a thousand output pixels, packing the flipped weight costs more than the
    // im2col path's scatter saves (ResNet-18's last two stages at 64×64).
    if s.stride != 1
        || g.kh != g.kw
        || s.padding > span
        || g.pointwise()
        || g.groups() != 1
        || g.p() < 1024
    {
        return None;
    }
    let t = Geom {
        n: g.n,
        h: g.ho,
        w: g.wo,
        c: g.cout,
        cout: g.c,
        kh: g.kh,
        kw: g.kw,
        ho: g.h,
        wo: g.w,
        s: ConvSpec {
            stride: 1,
            padding: span - s.padding,
            dilation: s.dilation,
            groups: 1,
        },
        force_inner: false,
    };
    if !t.direct() {
        return None;
    }
    let pw = PackedWeight::for_input_grad(w, [g.cout, g.c, g.kh, g.kw])?;
    Some(conv_direct::forward(dy, &pw, &t, &Epilogue::NONE))
}

/// Gradient of the weight: `x` NHWC and `dy` NHWC → `[out, in/groups, kh, kw]`.
pub fn conv2d_backward_weight(
    x: &[f32],
    xs: &[usize],
    dy: &[f32],
    ws: &[usize],
    s: ConvSpec,
) -> candle_core::Result<Vec<f32>> {
    conv2d_backward_weight_cols(x, xs, dy, ws, s, None)
}

/// Adds the weight gradient (as [`conv2d_backward_weight`]) into `out` (`[out, in/groups, kh,
/// kw]`). Where the im2col columns are already in the weight's order (few output pixels: the
/// later, larger layers), the product accumulates straight into `out`.
pub fn conv2d_backward_weight_add(
    x: &[f32],
    xs: &[usize],
    dy: &[f32],
    ws: &[usize],
    s: ConvSpec,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let g = Geom::new(xs, ws, s)?;
    let (p, k, cog) = (g.p(), g.k(), g.cout_g());
    if out.len() != g.cout * k {
        candle_core::bail!("conv2d: {} gradient values for a weight {ws:?}", out.len());
    }
    if conv_direct::weight_grad_supported(&g) {
        conv_direct::backward_weight_add(x, &g, dy, out);
        return Ok(());
    }
    if g.channel_inner() || g.pointwise() {
        add_into(out, &conv2d_backward_weight(x, xs, dy, ws, s)?);
        return Ok(());
    }
    with_cols(p * k, |col| {
        for gi in 0..g.groups() {
            im2col(x, &g, gi, col);
            gemm_tiled(
                cog,
                k,
                p,
                &mut out[gi * cog * k..],
                k,
                true,
                &dy[gi * cog..],
                1,
                g.cout,
                col,
                k,
                1,
            );
        }
    });
    Ok(())
}

fn conv2d_backward_weight_cols(
    x: &[f32],
    xs: &[usize],
    dy: &[f32],
    ws: &[usize],
    s: ConvSpec,
    cols: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let g = Geom::new(xs, ws, s)?;
    let (p, k, cog) = (g.p(), g.k(), g.cout_g());
    if conv_direct::weight_grad_supported(&g) {
        let mut dw = vec![0f32; g.cout * k];
        conv_direct::backward_weight_add(x, &g, dy, &mut dw);
        return Ok(dw);
    }
    let mut dwr = scratch(g.cout * k);
    if let Some(col) = cols.filter(|c| c.len() == p * k && g.groups() == 1) {
        gemm_tiled(g.cout, k, p, &mut dwr, k, false, dy, 1, g.cout, col, k, 1);
        return Ok(weight_from_cols(dwr, &g));
    }
    if g.pointwise() {
        gemm_tiled(
            g.cout, g.c, p, &mut dwr, g.c, false, dy, 1, g.cout, x, g.c, 1,
        );
    } else {
        with_cols(p * k, |col| {
            for gi in 0..g.groups() {
                im2col(x, &g, gi, col);
                gemm_tiled(
                    cog,
                    k,
                    p,
                    &mut dwr[gi * cog * k..],
                    k,
                    false,
                    &dy[gi * cog..],
                    1,
                    g.cout,
                    col,
                    k,
                    1,
                );
            }
        });
    }
    Ok(weight_from_cols(dwr, &g))
}

/// The forward op: `(x NHWC, weight)` → output NHWC. When the weight is trained, it keeps the
/// im2col matrix for the weight gradient instead of rebuilding it.
struct Conv2dOp(ConvSpec, Option<Cols>);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "wick-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_f32(s1, l1, "conv2d", "the input")?;
        let w = op_f32(s2, l2, "conv2d", "the weight")?;
        let (out, shape) =
            conv2d_forward_keep(x, l1.dims(), w, l2.dims(), self.0, self.1.as_ref())?;
        Ok((CpuStorage::F32(out), Shape::from(shape.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &Conv2dInputGrad(self.0, x.dims().to_vec()))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let cols = self
                .1
                .as_ref()
                .and_then(|c| c.lock().unwrap_or_else(|e| e.into_inner()).take());
            Some(x.apply_op2_no_bwd(&dy, &Conv2dWeightGrad(self.0, w.dims().to_vec(), cols))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `(dy, weight)` → gradient of the input, whose dims are the op's second field.
struct Conv2dInputGrad(ConvSpec, Vec<usize>);

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "wick-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = op_f32(s1, l1, "conv2d", "the output gradient")?;
        let w = op_f32(s2, l2, "conv2d", "the weight")?;
        let dx = conv2d_backward_input(dy, &self.1, w, l2.dims(), self.0)?;
        Ok((CpuStorage::F32(dx), Shape::from(self.1.clone())))
    }
}

/// `(x, dy)` → gradient of the weight, whose dims are the op's second field.
struct Conv2dWeightGrad(ConvSpec, Vec<usize>, Option<Vec<f32>>);

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "wick-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_f32(s1, l1, "conv2d", "the input")?;
        let dy = op_f32(s2, l2, "conv2d", "the output gradient")?;
        let dw = conv2d_backward_weight_cols(x, l1.dims(), dy, &self.1, self.0, self.2.as_deref())?;
        Ok((CpuStorage::F32(dw), Shape::from(self.1.clone())))
    }
}

/// A forward-only convolution followed by a per-channel affine map and an optional ReLU, all
/// on the convolution's own output buffer: evaluation-mode `conv → BatchNorm → ReLU`.
struct Conv2dAffine {
    spec: ConvSpec,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
    packed: Option<Arc<PackedWeight>>,
}

impl CustomOp2 for Conv2dAffine {
    fn name(&self) -> &'static str {
        "wick-conv2d-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_f32(s1, l1, "conv2d", "the input")?;
        let w = op_f32(s2, l2, "conv2d", "the weight")?;
        let g = Geom::new(l1.dims(), l2.dims(), self.spec)?;
        let c = g.cout;
        if self.scale.len() != c || self.shift.len() != c {
            candle_core::bail!(
                "conv2d: {} scales for {c} output channels",
                self.scale.len()
            );
        }
        let shape = [g.n, g.ho, g.wo, c];
        if g.direct() {
            let dims = [g.cout, g.c, g.kh, g.kw];
            let own;
            let pw = match self.packed.as_deref().filter(|p| p.dims == dims) {
                Some(p) => Some(p),
                None => {
                    own = PackedWeight::new(w, dims);
                    own.as_ref()
                }
            };
            if let Some(pw) = pw {
                let epi = Epilogue {
                    scale: Some(&self.scale),
                    shift: Some(&self.shift),
                    relu: self.relu,
                };
                let out = conv_direct::forward(x, pw, &g, &epi);
                return Ok((CpuStorage::F32(out), Shape::from(shape.to_vec())));
            }
        }
        let (mut out, _) = conv2d_forward(x, l1.dims(), w, l2.dims(), self.spec)?;
        affine_in_place(&mut out, c, &self.scale, &self.shift, self.relu);
        Ok((CpuStorage::F32(out), Shape::from(shape.to_vec())))
    }
}

/// `y = max(y·scale + shift, 0)` per channel of NHWC rows of `c` values (the ReLU only with
/// `relu`): an evaluation-mode BatchNorm (and ReLU) on a convolution's output.
pub fn affine_in_place(y: &mut [f32], c: usize, scale: &[f32], shift: &[f32], relu: bool) {
    y.par_chunks_mut(c * 64).for_each(|rows| {
        for row in rows.chunks_exact_mut(c) {
            for ((v, &a), &b) in row.iter_mut().zip(scale).zip(shift) {
                *v = *v * a + b;
            }
            if relu {
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    });
}

/// `max(conv2d(x, w)·scale + shift, 0)` (the ReLU only with `relu`) per output channel, with no
/// gradient: a frozen `conv → BatchNorm (eval) → ReLU` in one pass over the output. `packed`
/// is the weight already in the direct kernel's layout (a frozen weight, packed once).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_affine(
    x: &Tensor,
    weight: &Tensor,
    packed: Option<Arc<PackedWeight>>,
    spec: ConvSpec,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let op = Conv2dAffine {
        spec,
        scale,
        shift,
        relu,
        packed,
    };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}

/// 2-D convolution of NHWC `x` with a PyTorch-layout `weight`, differentiable through
/// candle's autograd. CPU f32 only; other devices use candle's own convolution.
pub fn conv2d(x: &Tensor, weight: &Tensor, spec: ConvSpec) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let y = x.permute((0, 3, 1, 2))?.conv2d(
            weight,
            spec.padding,
            spec.stride,
            spec.dilation,
            spec.groups,
        )?;
        return y.permute((0, 2, 3, 1))?.contiguous();
    }
    let keep = weight.track_op().then(|| Arc::new(Mutex::new(None)));
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2dOp(spec, keep))
}
