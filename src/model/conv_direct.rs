//! Direct (implicit-GEMM) forward convolution for NHWC f32 activations on AVX-512 CPUs, with a
//! fused per-channel epilogue (`y·scale + shift`, then an optional ReLU).
//!
//! The im2col path ([`super::conv`]) writes the column matrix, and the `gemm` crate then packs
//! it (and the weight) again before multiplying. Here neither copy exists: a micro-kernel
//! computes `MR` output pixels × `NR` output channels at once, broadcasting each input
//! value straight from the (zero-padded) NHWC input, with the weight repacked once per call
//! into panels of `[K][NR]` (columns ordered `(ki, kj, channel)`). BatchNorm's evaluation-mode
//! affine map and the ReLU are applied to the accumulators before they are stored, so a frozen
//! `conv → BatchNorm → ReLU` touches its output once.
//!
//! Every output value is one fixed-order sum over `(ki, kj, channel)`, and tiles (a panel of
//! output channels × a block of pixels) are independent, so the result does not depend on the
//! thread count, or on which other images share the batch.

use rayon::prelude::*;

use super::conv::Geom;
use super::kernels::DstPtr;

/// Output pixels per micro-kernel call.
const MR: usize = 12;
/// Output channels per micro-kernel call (two 16-lane registers).
const NR: usize = 32;

/// Whether this CPU has the instructions the kernel needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("WICK_NO_DIRECT_CONV").is_none()
                && std::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the kernel takes the convolution `g`: ungrouped, output channels a multiple of
/// [`NR`], on a CPU that has AVX-512.
pub(crate) fn supported(g: &Geom) -> bool {
    available() && g.groups() == 1 && g.cout.is_multiple_of(NR) && g.c > 0
}

/// The per-channel map applied to the accumulators before they are stored.
pub struct Epilogue<'a> {
    pub scale: Option<&'a [f32]>,
    pub shift: Option<&'a [f32]>,
    pub relu: bool,
}

impl Epilogue<'static> {
    /// The accumulators as they are.
    pub const NONE: Self = Self {
        scale: None,
        shift: None,
        relu: false,
    };
}

/// A convolution weight in the kernel's layout, made once for a weight that does not change
/// (see [`crate::model::ParamStore::derived`]).
pub struct PackedWeight {
    /// The PyTorch-layout shape it was made from, `[out, in, kh, kw]`.
    pub dims: [usize; 4],
    data: Vec<f32>,
}

impl PackedWeight {
    /// Packs `w` (`[out, in, kh, kw]`), if the kernel can use it on this CPU.
    pub fn new(w: &[f32], dims: [usize; 4]) -> Option<Self> {
        let [cout, cin, kh, kw] = dims;
        let fits = available() && cout.is_multiple_of(NR) && w.len() == cout * cin * kh * kw;
        fits.then(|| Self {
            dims,
            data: pack_panels(cout, cin, kh * kw, cin * kh * kw, w, |jp, c, t| {
                (jp * NR * cin + c) * kh * kw + t
            }),
        })
    }

    /// The weight of the convolution that gives the input gradient of a stride-1 convolution
    /// by `w` (`[out, in, kh, kw]`): `w'[c][o][kh−1−i][kw−1−j] = w[o][c][i][j]`, packed.
    /// Its dims are `[in, out, kh, kw]`.
    pub fn for_input_grad(w: &[f32], dims: [usize; 4]) -> Option<Self> {
        let [cout, cin, kh, kw] = dims;
        let kk = kh * kw;
        let fits = available() && cin.is_multiple_of(NR) && w.len() == cout * cin * kk;
        fits.then(|| Self {
            dims: [cin, cout, kh, kw],
            // Column `jj` of panel `jp` is input channel c = jp·NR + jj; row (t, o) reads
            // w[o][c][kk − 1 − t].
            data: pack_panels(cin, cout, kk, kk, w, |jp, o, t| {
                (o * cin + jp * NR) * kk + kk - 1 - t
            }),
        })
    }

    /// [`Self::new`] of a CPU f32 tensor of rank 4.
    pub fn from_tensor(w: &candle_core::Tensor) -> candle_core::Result<Option<Self>> {
        let Ok(&[a, b, c, d]) = <&[usize; 4]>::try_from(w.dims()) else {
            return Ok(None);
        };
        if !available() || !w.device().is_cpu() {
            return Ok(None);
        }
        let v = w
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(Self::new(&v, [a, b, c, d]))
    }
}

/// Panels `[cols / NR][kk·rows][NR]`: row `t·rows + r` of panel `jp` holds columns
/// `jp·NR + jj`, read from `w[at(jp, r, t) + jj·stride]`. For a forward weight
/// `[out, in, kh, kw]`, columns are outputs, rows input channels and `t` the tap.
fn pack_panels(
    cols: usize,
    rows: usize,
    kk: usize,
    stride: usize,
    w: &[f32],
    at: impl Fn(usize, usize, usize) -> usize + Sync,
) -> Vec<f32> {
    /// Rows per block: a block's sources stay in L1 while each destination run of `NR` values
    /// is gathered from them.
    const RB: usize = 16;
    assert_eq!(w.len(), cols * rows * kk, "conv_direct: weight size");
    let mut out = scratch(w.len());
    out.par_chunks_mut(rows * kk * NR)
        .enumerate()
        .for_each(|(jp, panel)| {
            for r0 in (0..rows).step_by(RB) {
                for t in 0..kk {
                    for r in r0..(r0 + RB).min(rows) {
                        let dst = &mut panel[(t * rows + r) * NR..][..NR];
                        let src = &w[at(jp, r, t)..][..(NR - 1) * stride + 1];
                        for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                            *d = *s;
                        }
                    }
                }
            }
        });
    out
}

/// A vector of `n` values that the caller overwrites completely before reading.
fn scratch(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and every caller writes all `n` values before
    // any is read (the packed panels cover every (tap, channel, column); the tiles cover every
    // output).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// The input with `padding` zeros around every image (borrowed when there is no padding).
fn pad_input<'a>(x: &'a [f32], g: &Geom) -> std::borrow::Cow<'a, [f32]> {
    let p = g.s.padding;
    if p == 0 {
        return std::borrow::Cow::Borrowed(x);
    }
    let (hp, wp) = (g.h + 2 * p, g.w + 2 * p);
    let mut out = vec![0f32; g.n * hp * wp * g.c];
    out.par_chunks_mut(hp * wp * g.c)
        .zip(x.par_chunks(g.h * g.w * g.c))
        .for_each(|(dst, src)| {
            for (i, row) in src.chunks_exact(g.w * g.c).enumerate() {
                dst[((i + p) * wp + p) * g.c..][..g.w * g.c].copy_from_slice(row);
            }
        });
    std::borrow::Cow::Owned(out)
}

/// Offset of each tap `(ki, kj)`, in order, from a window's origin in the padded input.
fn tap_offsets(g: &Geom) -> Vec<usize> {
    let (s, wp) = (g.s, g.w + 2 * g.s.padding);
    (0..g.kh)
        .flat_map(|ki| (0..g.kw).map(move |kj| (ki * s.dilation * wp + kj * s.dilation) * g.c))
        .collect()
}

/// Where output pixel `i`'s window starts in the padded input.
fn window_origin(g: &Geom, i: usize) -> usize {
    let s = g.s;
    let (hp, wp) = (g.h + 2 * s.padding, g.w + 2 * s.padding);
    let (n, r) = (i / (g.ho * g.wo), i % (g.ho * g.wo));
    let (oh, ow) = (r / g.wo, r % g.wo);
    ((n * hp + oh * s.stride) * wp + ow * s.stride) * g.c
}

/// Forward convolution of NHWC `x` (`[n, h, w, c]`) with the packed weight `w` (made from a
/// `[out, in, kh, kw]` weight), the epilogue applied: NHWC `[n, ho, wo, out]`. The caller
/// checks [`supported`].
pub(crate) fn forward(x: &[f32], w: &PackedWeight, g: &Geom, epi: &Epilogue) -> Vec<f32> {
    assert!(supported(g), "conv_direct: unsupported convolution {g:?}");
    assert_eq!(x.len(), g.n * g.h * g.w * g.c, "conv_direct: input size");
    assert_eq!(
        w.dims,
        [g.cout, g.c, g.kh, g.kw],
        "conv_direct: weight shape"
    );
    let xp = pad_input(x, g);
    let packed = &w.data[..];
    let taps = tap_offsets(g);
    let p = g.p();
    let origin: Vec<usize> = (0..p).map(|i| window_origin(g, i)).collect();
    let k = g.k();
    let panels = g.cout / NR;
    let blocks = p.div_ceil(MR);
    // Every tile stores all of its rows and columns.
    let mut out = scratch(p * g.cout);
    let dst = DstPtr(out.as_mut_ptr());
    let (xp, packed, taps, origin) = (&xp[..], packed, &taps[..], &origin[..]);
    let tile = |t: usize| {
        let (jp, ib) = (t / blocks, t % blocks);
        let i0 = ib * MR;
        let rows = MR.min(p - i0);
        // A short last block repeats its last pixel; only `rows` results are stored.
        let mut org = [0usize; MR];
        for (r, o) in org.iter_mut().enumerate() {
            *o = origin[i0 + r.min(rows - 1)];
        }
        let j0 = jp * NR;
        let scale = epi.scale.map(|v| &v[j0..j0 + NR]);
        let shift = epi.shift.map(|v| &v[j0..j0 + NR]);
        // SAFETY: `supported` checked AVX-512; every origin + tap + channel lies inside
        // the padded input (the output size was derived from it), the panel holds K×NR
        // values, and this tile writes rows i0..i0+rows, columns j0..j0+NR, which no other
        // tile writes.
        unsafe {
            micro(
                xp,
                &org,
                taps,
                g.c,
                &packed[jp * k * NR..][..k * NR],
                dst.at(i0 * g.cout + j0),
                g.cout,
                rows,
                scale,
                shift,
                epi.relu,
            )
        }
    };
    let tiles = panels * blocks;
    if rayon::current_num_threads() > 1 && p * k * g.cout >= 1 << 20 {
        (0..tiles).into_par_iter().for_each(tile);
    } else {
        (0..tiles).for_each(tile);
    }
    out
}

/// Whether [`forward_by_weight_rows`] is the cheaper way to run the convolution `g` with a
/// weight that has to be packed for this call: fewer output pixels than output channels, so
/// packing the input (`p × k` values) costs less than packing the weight (`cout × k`).
pub(crate) fn weight_rows_cheaper(g: &Geom) -> bool {
    supported(g) && g.p().next_multiple_of(NR) < g.cout
}

/// Forward convolution of NHWC `x` with the PyTorch-layout weight `w` (`[out, in, kh, kw]`)
/// with the roles of the operands swapped: the micro-kernel broadcasts weight values, read
/// straight from the rows of `w`, and multiplies them by panels of [`NR`] output pixels packed
/// from the input (`[k][NR]`, rows ordered `(channel, ki, kj)` as a weight row is). That is
/// the cheap way for layers with few output pixels and many channels (ResNet's last stage at
/// 64×64 inputs: 64 pixels, 512 channels), where [`forward`] would spend as long repacking
/// the 9 MB weight as multiplying. The caller checks [`supported`].
pub(crate) fn forward_by_weight_rows(x: &[f32], w: &[f32], g: &Geom) -> Vec<f32> {
    assert!(supported(g), "conv_direct: unsupported convolution {g:?}");
    assert_eq!(x.len(), g.n * g.h * g.w * g.c, "conv_direct: input size");
    let k = g.k();
    assert_eq!(w.len(), g.cout * k, "conv_direct: weight size");
    let xp = pad_input(x, g);
    let p = g.p();
    let pp = p.next_multiple_of(NR);
    let taps = tap_offsets(g);
    // Input panels `[pp / NR][k][NR]`; pixels past `p` are zeros.
    let mut panels = scratch(pp * k);
    panels
        .par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(pb, panel)| {
            // Window origins of the panel's pixels (a short last panel repeats its last
            // pixel, then zeroes those columns).
            let valid = NR.min(p - pb * NR);
            let org: [usize; NR] =
                std::array::from_fn(|r| window_origin(g, pb * NR + r.min(valid - 1)));
            let mut rows = panel.chunks_exact_mut(NR);
            for c in 0..g.c {
                for &off in &taps {
                    let row = rows.next().expect("k rows of NR");
                    for (d, &o) in row.iter_mut().zip(&org) {
                        *d = xp[o + off + c];
                    }
                    row[valid..].fill(0.0);
                }
            }
        });
    // The transposed output `[cout][pp]`, then NHWC.
    let mut out_t = scratch(g.cout * pp);
    let dst = DstPtr(out_t.as_mut_ptr());
    let row_blocks = g.cout.div_ceil(MR);
    let (panels, taps0) = (&panels[..], [0usize]);
    let tile = |t: usize| {
        let (pb, jb) = (t / row_blocks, t % row_blocks);
        let j0 = jb * MR;
        let rows = MR.min(g.cout - j0);
        let org: [usize; MR] = std::array::from_fn(|r| (j0 + r.min(rows - 1)) * k);
        // SAFETY: `supported` checked AVX-512; each origin is a weight row of `k` values, the
        // panel holds k×NR values, and this tile writes rows j0..j0+rows, columns
        // pb·NR..pb·NR+NR of `out_t` (row stride pp), which no other tile writes.
        unsafe {
            micro(
                w,
                &org,
                &taps0,
                k,
                &panels[pb * k * NR..][..k * NR],
                dst.at(j0 * pp + pb * NR),
                pp,
                rows,
                None,
                None,
                false,
            )
        }
    };
    let tiles = (pp / NR) * row_blocks;
    if rayon::current_num_threads() > 1 && p * k * g.cout >= 1 << 20 {
        (0..tiles).into_par_iter().for_each(tile);
    } else {
        (0..tiles).for_each(tile);
    }
    let mut out = scratch(p * g.cout);
    for (i, row) in out.chunks_exact_mut(g.cout).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = out_t[j * pp + i];
        }
    }
    out
}

/// Whether [`backward_weight_add`] takes the weight gradient of `g`: a network's first layer,
/// with a handful of input channels (RGB or grayscale). There im2col copies 1–3 values per
/// tap and the GEMM has a short inner dimension, so both run far below the FMA units' speed.
pub(crate) fn weight_grad_supported(g: &Geom) -> bool {
    supported(g) && g.c <= 4
}

/// Adds the weight gradient of the convolution `g` (`[out, in, kh, kw]`) to `out`, from its
/// NHWC input `x` and output gradient `dy` (`[p, cout]`): for each block of [`MR`] weight
/// columns `(channel, ki, kj)` and [`NR`] output channels, the micro-kernel sums
/// `x[window(p) + column] · dy[p]` over every output pixel `p` in order, broadcasting the input
/// values straight from the padded input. The caller checks [`weight_grad_supported`].
pub(crate) fn backward_weight_add(x: &[f32], g: &Geom, dy: &[f32], out: &mut [f32]) {
    assert!(supported(g), "conv_direct: unsupported convolution {g:?}");
    assert_eq!(x.len(), g.n * g.h * g.w * g.c, "conv_direct: input size");
    let (p, k) = (g.p(), g.k());
    assert_eq!(dy.len(), p * g.cout, "conv_direct: output gradient size");
    assert_eq!(out.len(), g.cout * k, "conv_direct: weight gradient size");
    let xp = pad_input(x, g);
    // Offset of weight column `(c, ki, kj)` from a window's origin.
    let taps = tap_offsets(g);
    let cols: Vec<usize> = (0..g.c)
        .flat_map(|c| taps.iter().map(move |&t| t + c))
        .collect();
    let origin: Vec<usize> = (0..p).map(|i| window_origin(g, i)).collect();
    let col_blocks = k.div_ceil(MR);
    let panels = g.cout / NR;
    // Each tile's sums, `[MR][NR]` (weight column, output channel), tiles ordered (panel,
    // column block), each panel padded to whole groups. A task takes a group of GROUP column
    // blocks of one panel and walks the pixels in chunks of CHUNK, so that every block of the
    // group reads a chunk of `dy` from cache.
    const GROUP: usize = 16;
    const CHUNK: usize = 512;
    let groups = col_blocks.div_ceil(GROUP);
    let blocks_per_panel = groups * GROUP;
    let mut sums = vec![0f32; panels * blocks_per_panel * MR * NR];
    let (xp, cols, origin) = (&xp[..], &cols[..], &origin[..]);
    let task = |(t, group): (usize, &mut [f32])| {
        let (jp, gi) = (t / groups, t % groups);
        for p0 in (0..p).step_by(CHUNK) {
            let p1 = (p0 + CHUNK).min(p);
            for (bi, acc) in group.chunks_mut(MR * NR).enumerate() {
                let c0 = (gi * GROUP + bi) * MR;
                if c0 >= k {
                    break;
                }
                let n = MR.min(k - c0);
                let offs: [usize; MR] = std::array::from_fn(|i| cols[c0 + i.min(n - 1)]);
                // SAFETY: `supported` checked AVX-512; every origin + column offset lies
                // inside the padded input, `dy` holds `p` rows of `cout` values and
                // `jp·NR + NR ≤ cout`, and `acc` is this tile's own MR×NR block.
                unsafe {
                    micro_weight_grad(
                        xp,
                        &origin[p0..p1],
                        &offs,
                        &dy[p0 * g.cout + jp * NR..],
                        g.cout,
                        acc,
                    )
                }
            }
        }
    };
    if rayon::current_num_threads() > 1 && p * k * g.cout >= 1 << 20 {
        sums.par_chunks_mut(GROUP * MR * NR)
            .enumerate()
            .for_each(task);
    } else {
        sums.chunks_mut(GROUP * MR * NR).enumerate().for_each(task);
    }
    for (t, acc) in sums.chunks_exact(MR * NR).enumerate() {
        let (jp, cb) = (t / blocks_per_panel, t % blocks_per_panel);
        let c0 = cb * MR;
        if c0 >= k {
            continue;
        }
        for i in 0..MR.min(k - c0) {
            for j in 0..NR {
                out[(jp * NR + j) * k + c0 + i] += acc[i * NR + j];
            }
        }
    }
}

/// `acc[i][j] += Σ_p xp[origin[p] + offs[i]] · dy[p·ld + j]` for `MR` weight columns × `NR`
/// output channels, summed over the pixels in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_weight_grad(
    xp: &[f32],
    origin: &[usize],
    offs: &[usize; MR],
    dy: &[f32],
    ld: usize,
    acc_out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let sums = acc_out.as_mut_ptr();
    let mut acc: [[__m512; 2]; MR] = std::array::from_fn(|i| {
        [
            _mm512_loadu_ps(sums.add(i * NR)),
            _mm512_loadu_ps(sums.add(i * NR + 16)),
        ]
    });
    let base = xp.as_ptr();
    let mut d = dy.as_ptr();
    for &o in origin {
        let b0 = _mm512_loadu_ps(d);
        let b1 = _mm512_loadu_ps(d.add(16));
        d = d.add(ld);
        let a = base.add(o);
        for i in 0..MR {
            let av = _mm512_set1_ps(*a.add(offs[i]));
            acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(sums.add(i * NR), a[0]);
        _mm512_storeu_ps(sums.add(i * NR + 16), a[1]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro_weight_grad(
    _: &[f32],
    _: &[usize],
    _: &[usize; MR],
    _: &[f32],
    _: usize,
    _: &mut [f32],
) {
    unreachable!("conv_direct: the kernel needs x86-64 with AVX-512")
}

/// One tile: `MR` pixels (window origins `org` in `xp`) × `NR` channels of the panel `b`
/// (`[taps·c][NR]`), the epilogue applied, `rows` rows stored at `out` (row stride `ld`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    xp: &[f32],
    org: &[usize; MR],
    taps: &[usize],
    c: usize,
    b: &[f32],
    out: *mut f32,
    ld: usize,
    rows: usize,
    scale: Option<&[f32]>,
    shift: Option<&[f32]>,
    relu: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let base = xp.as_ptr();
    let mut bp = b.as_ptr();
    for &t in taps {
        let a: [*const f32; MR] = std::array::from_fn(|i| base.add(org[i] + t));
        for ci in 0..c {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            bp = bp.add(NR);
            for i in 0..MR {
                let av = _mm512_set1_ps(*a[i].add(ci));
                acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
            }
        }
    }
    let (s0, s1) = match scale {
        Some(s) => (
            _mm512_loadu_ps(s.as_ptr()),
            _mm512_loadu_ps(s.as_ptr().add(16)),
        ),
        None => (_mm512_set1_ps(1.0), _mm512_set1_ps(1.0)),
    };
    let (h0, h1) = match shift {
        Some(s) => (
            _mm512_loadu_ps(s.as_ptr()),
            _mm512_loadu_ps(s.as_ptr().add(16)),
        ),
        None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    let zero = _mm512_setzero_ps();
    for (i, acc) in acc.iter().enumerate().take(rows) {
        let mut v0 = _mm512_fmadd_ps(acc[0], s0, h0);
        let mut v1 = _mm512_fmadd_ps(acc[1], s1, h1);
        if relu {
            v0 = _mm512_max_ps(v0, zero);
            v1 = _mm512_max_ps(v1, zero);
        }
        let o = out.add(i * ld);
        _mm512_storeu_ps(o, v0);
        _mm512_storeu_ps(o.add(16), v1);
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    _: &[f32],
    _: &[usize; MR],
    _: &[usize],
    _: usize,
    _: &[f32],
    _: *mut f32,
    _: usize,
    _: usize,
    _: Option<&[f32]>,
    _: Option<&[f32]>,
    _: bool,
) {
    unreachable!("conv_direct: available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::conv::ConvSpec;
    use crate::rng::Rng;

    /// Calls `f(output pixel, input pixel, ki, kj)` for every output pixel and every tap whose
    /// input lies inside the image (pixel indices count NHWC pixels, without channels).
    fn visit_taps(g: &Geom, mut f: impl FnMut(usize, usize, usize, usize)) {
        let s = g.s;
        for n in 0..g.n {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let pix = (n * g.ho + oh) * g.wo + ow;
                    for ki in 0..g.kh {
                        for kj in 0..g.kw {
                            let ih =
                                (oh * s.stride + ki * s.dilation) as isize - s.padding as isize;
                            let iw =
                                (ow * s.stride + kj * s.dilation) as isize - s.padding as isize;
                            if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                continue;
                            }
                            f(pix, (n * g.h + ih as usize) * g.w + iw as usize, ki, kj);
                        }
                    }
                }
            }
        }
    }

    /// `y[n, oh, ow, o] = Σ x[n, ih, iw, c] · w[o, c, ki, kj]` in f64, NHWC.
    fn naive(x: &[f32], w: &[f32], g: &Geom) -> Vec<f64> {
        let mut y = vec![0f64; g.p() * g.cout];
        visit_taps(g, |pix, src, ki, kj| {
            for o in 0..g.cout {
                for c in 0..g.c {
                    let wv = w[((o * g.c + c) * g.kh + ki) * g.kw + kj];
                    y[pix * g.cout + o] += x[src * g.c + c] as f64 * wv as f64;
                }
            }
        });
        y
    }

    /// Whether this CPU runs the kernels (elsewhere they are never used, and there is nothing
    /// to check).
    fn kernel_here() -> bool {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the direct kernel is never used here");
        }
        available()
    }

    /// Asserts `got` matches `want` within 1e-4, relative to values above 1.
    fn assert_close(got: &[f32], want: &[f64], g: &Geom) {
        assert_eq!(got.len(), want.len(), "{g:?}");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() < 1e-4 * b.abs().max(1.0),
                "{g:?} at {i}: {a} vs {b}"
            );
        }
    }

    /// `n` values uniform in [−0.5, 0.5).
    fn uniform(r: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| r.next_f32() - 0.5).collect()
    }

    /// `n` images of `h × (h + 1)` pixels and `c` channels, `cout` outputs, a `k × k` kernel.
    fn geom(n: usize, h: usize, c: usize, cout: usize, k: usize, spec: ConvSpec) -> Geom {
        Geom::new(&[n, h, h + 1, c], &[cout, c, k, k], spec).unwrap()
    }

    fn spec(stride: usize, padding: usize, dilation: usize) -> ConvSpec {
        ConvSpec {
            stride,
            padding,
            dilation,
            groups: 1,
        }
    }

    #[test]
    fn forward_matches_a_scalar_reference_with_the_epilogue() {
        if !kernel_here() {
            return;
        }
        let mut r = Rng::new(11);
        // Pixel counts that are and are not multiples of MR; strides, padding, dilation.
        for g in [
            geom(2, 7, 3, 32, 3, spec(1, 1, 1)),
            geom(1, 9, 5, 64, 7, spec(2, 3, 1)),
            geom(3, 6, 16, 32, 1, spec(2, 0, 1)),
            geom(1, 11, 8, 96, 3, spec(1, 2, 2)),
            geom(2, 4, 33, 32, 3, spec(3, 1, 1)),
        ] {
            let x = uniform(&mut r, g.n * g.h * g.w * g.c);
            let w = uniform(&mut r, g.cout * g.c * g.kh * g.kw);
            let scale: Vec<f32> = (0..g.cout).map(|_| r.next_f32() + 0.5).collect();
            let shift = uniform(&mut r, g.cout);
            let want = naive(&x, &w, &g);
            let pw = PackedWeight::new(&w, [g.cout, g.c, g.kh, g.kw]).unwrap();
            let plain = forward(&x, &pw, &g, &Epilogue::NONE);
            let epi = Epilogue {
                scale: Some(&scale),
                shift: Some(&shift),
                relu: true,
            };
            let fused = forward(&x, &pw, &g, &epi);
            for (i, &v) in want.iter().enumerate() {
                let o = i % g.cout;
                assert!((plain[i] as f64 - v).abs() < 1e-4, "{g:?} at {i}");
                let f = (v * scale[o] as f64 + shift[o] as f64).max(0.0);
                assert!((fused[i] as f64 - f).abs() < 1e-4, "{g:?} fused at {i}");
            }
        }
    }

    /// The operand-swapped forward pass (few pixels, many channels) equals the reference,
    /// with pixel counts below, at and past a panel of NR, channel counts that are not
    /// multiples of MR, strides, padding and dilation.
    #[test]
    fn forward_by_weight_rows_matches_a_scalar_reference() {
        if !kernel_here() {
            return;
        }
        let mut r = Rng::new(12);
        for g in [
            geom(2, 2, 40, 64, 3, spec(1, 1, 1)),
            geom(4, 4, 9, 96, 3, spec(2, 1, 1)),
            geom(3, 5, 7, 128, 3, spec(1, 1, 1)),
            geom(1, 7, 5, 96, 3, spec(1, 2, 2)),
            geom(5, 3, 16, 160, 1, spec(1, 0, 1)),
        ] {
            assert!(weight_rows_cheaper(&g), "{g:?}");
            let x = uniform(&mut r, g.n * g.h * g.w * g.c);
            let w = uniform(&mut r, g.cout * g.c * g.kh * g.kw);
            let want = naive(&x, &w, &g);
            assert_close(&forward_by_weight_rows(&x, &w, &g), &want, &g);
        }
    }

    /// The direct weight gradient equals `Σ x · dy` from a scalar reference, added to what
    /// the buffer held: 1–4 input channels, strides, padding, dilation, pixel counts past a
    /// chunk, weight columns not a multiple of MR.
    #[test]
    fn weight_grad_matches_a_scalar_reference() {
        if !kernel_here() {
            return;
        }
        let mut r = Rng::new(13);
        for g in [
            geom(2, 20, 3, 64, 7, spec(2, 3, 1)),
            geom(3, 17, 1, 32, 3, spec(1, 1, 1)),
            geom(1, 9, 4, 96, 5, spec(1, 4, 2)),
            geom(5, 6, 2, 32, 1, spec(1, 0, 1)),
        ] {
            assert!(weight_grad_supported(&g), "{g:?}");
            let x = uniform(&mut r, g.n * g.h * g.w * g.c);
            let dy = uniform(&mut r, g.p() * g.cout);
            let mut want = vec![0.25f64; g.cout * g.k()];
            visit_taps(&g, |pix, src, ki, kj| {
                for c in 0..g.c {
                    let xv = x[src * g.c + c] as f64;
                    for o in 0..g.cout {
                        want[((o * g.c + c) * g.kh + ki) * g.kw + kj] +=
                            xv * dy[pix * g.cout + o] as f64;
                    }
                }
            });
            let mut got = vec![0.25f32; g.cout * g.k()];
            backward_weight_add(&x, &g, &dy, &mut got);
            assert_close(&got, &want, &g);
        }
    }

    /// The input gradient through the transposed, flipped weight equals the gradient of the
    /// forward convolution, scattered back by a scalar reference.
    #[test]
    fn input_grad_matches_a_scalar_reference() {
        if !kernel_here() {
            return;
        }
        let mut r = Rng::new(12);
        for (h, c, cout, k, pad, dil) in [
            (6, 32, 32, 3, 1, 1),
            (7, 32, 64, 3, 2, 2),
            (5, 64, 32, 5, 1, 1),
        ] {
            let g = geom(2, h, c, cout, k, spec(1, pad, dil));
            let w = uniform(&mut r, g.cout * c * k * k);
            let dy = uniform(&mut r, g.n * g.ho * g.wo * cout);
            let mut want = vec![0f64; g.n * g.h * g.w * c];
            for n in 0..g.n {
                for oh in 0..g.ho {
                    for ow in 0..g.wo {
                        for ki in 0..k {
                            for kj in 0..k {
                                let ih = (oh + ki * dil) as isize - pad as isize;
                                let iw = (ow + kj * dil) as isize - pad as isize;
                                if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                    continue;
                                }
                                let at = ((n * g.h + ih as usize) * g.w + iw as usize) * c;
                                for o in 0..cout {
                                    let d = dy[((n * g.ho + oh) * g.wo + ow) * cout + o] as f64;
                                    for ci in 0..c {
                                        want[at + ci] +=
                                            d * w[((o * c + ci) * k + ki) * k + kj] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let t = Geom::new(
                &[g.n, g.ho, g.wo, cout],
                &[c, cout, k, k],
                spec(1, dil * (k - 1) - pad, dil),
            )
            .unwrap();
            assert_eq!((t.ho, t.wo), (g.h, g.w));
            let pw = PackedWeight::for_input_grad(&w, [cout, c, k, k]).unwrap();
            let dx = forward(&dy, &pw, &t, &Epilogue::NONE);
            for (i, (&a, &b)) in dx.iter().zip(&want).enumerate() {
                assert!((a as f64 - b).abs() < 1e-4, "{g:?} at {i}: {a} vs {b}");
            }
        }
    }
}
