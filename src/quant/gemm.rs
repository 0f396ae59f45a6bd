//! Integer GEMM for int8 inference: `C[m, n] = A[m, k] · B[n, k]ᵀ`, exact in i32.
//!
//! `A` holds activations quantized per row, `B` the weights quantized per output channel, both
//! symmetric int8 in `[-127, 127]`. Products are accumulated exactly in i32 and turned back to
//! f32 by an epilogue (`acc · sa[i] · sw[j] + bias[j]`), tile by tile, so the i32 matrix never
//! exists as a whole.
//!
//! ## Kernel choice on AVX2
//! AVX2 has two integer multiply-adds. `vpmaddubsw` multiplies *unsigned* by signed bytes and
//! saturates its 16-bit pair sums; with signed activations it needs the `vpsignb`/`vpabsb`
//! trick (as llama.cpp's q8_0 dot) and then a `vpmaddwd` to widen: two multiplies for 32
//! products plus two extra ops. `vpmaddwd` on values widened to i16 does 16 products in one
//! multiply with no saturation at all. Both spend one multiply per 16 products, and the
//! multiply ports are the limit, so the i16 form is as fast with fewer instructions and is
//! exact by construction. Weights are widened once, when they are packed; activations when
//! they are quantized. The int8 form remains the storage format (checkpoints, memory of the
//! unpacked weights).
//!
//! ## AVX-512 VNNI
//! Where the CPU has it (and no AMX), `vpdpbusd` on 512-bit registers multiplies unsigned by
//! signed bytes, sums each group of four and accumulates: a whole quad panel row (16
//! channels × 4 values of `k`, 64 products) per instruction. Activations are shifted to
//! unsigned once per task (`u = a + 128`), and each output is corrected by `128 · Σ_k b[j][k]`
//! (stored when packing), which leaves exactly `Σ a·b` in i32: no saturation (`vpdpbusd`,
//! unlike `vpmaddubsw`, widens before it adds). Weights are packed as i8 quads, the AMX
//! layout. 1.7–2.2× the earlier `vpdpwssd` kernel on i16 pairs (32 products per instruction),
//! which it replaced (`examples/int8_gemm.rs`).
//!
//! ## AMX
//! Where the CPU and OS have Intel AMX (Sapphire Rapids and later), [`super::amx`]'s kernel
//! runs instead: one `tdpbssd` does a 16×64 by 64×16 tile product, 16,384 signed int8
//! multiply-adds into i32, exact like the others. It takes the weights packed as i8 quads
//! (`[k/4][16][4]`, `k` padded to 64) and narrows each task's activation rows to i8. One
//! thread, MiniLM's shapes: 300–1,000 G int8 ops/s against the VNNI kernel's 190–280
//! (`examples/int8_gemm.rs`). Weights are packed for the kernel [`Isa::detect`] picks;
//! `WICK_INT8_KERNEL` picks another (to compare).
//!
//! Pair layout (AVX2, portable): `B` is packed in panels of [`NR`] output channels; within a panel, each pair of
//! `k` holds the 16 channels' two values side by side (`[k/2][16][2]` i16), which is what one
//! `vpmaddwd` against a broadcast pair of `A` needs. `k` is padded to even with zeros.
//! The micro-kernel computes [`MR`]×[`NR`] outputs with 12 accumulators. Tiles of the output
//! are independent, so results do not depend on the thread count.

use rayon::prelude::*;

use crate::model::vecmath::dispatch;

/// Rows of the micro-kernel.
pub const MR: usize = 6;
/// Columns (output channels) of the micro-kernel and of a packed panel.
pub const NR: usize = 16;

/// Weights `[n, k]` packed for [`gemm`]: panels of [`NR`] rows of `B`, in the layout of the
/// kernel they were packed for.
#[derive(Debug, Clone)]
pub struct Packed {
    pub n: usize,
    pub k: usize,
    panels: Panels,
}

#[derive(Debug, Clone)]
enum Panels {
    /// i16 `[k/2][NR][2]` per panel (the AVX2 and portable kernels).
    Pairs(Vec<i16>),
    /// i8 `[kq/4][NR][4]` per panel, `k` padded to 64 (the AMX kernel, [`super::amx`], and
    /// the VNNI byte kernel), with each output channel's sum of weights (the byte kernel's
    /// correction for its unsigned activations).
    Quads { data: Vec<i8>, colsum: Vec<i32> },
}

impl Packed {
    /// `k` rounded up to even (the packed pair layout).
    pub fn kp(&self) -> usize {
        self.k.next_multiple_of(2)
    }

    fn pairs(&self) -> &[i16] {
        match &self.panels {
            Panels::Pairs(d) => d,
            Panels::Quads { .. } => unreachable!("pair kernels get pair-packed weights"),
        }
    }

    fn panel(&self, p: usize) -> &[i16] {
        let len = self.kp() * NR;
        &self.pairs()[p * len..(p + 1) * len]
    }

    /// Whether the panels are in the layout `isa`'s kernel reads.
    fn fits(&self, isa: Isa) -> bool {
        matches!(
            (&self.panels, isa),
            (Panels::Quads { .. }, Isa::Amx | Isa::Avx512Vnni)
                | (Panels::Pairs(_), Isa::Portable | Isa::Avx2)
        )
    }

    /// These panels when `isa`'s kernel reads them, else the same weights packed for it (the
    /// kernels' tasks and layouts differ).
    fn for_isa(&self, isa: Isa) -> std::borrow::Cow<'_, Packed> {
        if self.fits(isa) {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(pack_for(&self.unpack(), self.n, self.k, isa))
        }
    }

    /// The int8 weights `[n, k]` back.
    pub fn unpack(&self) -> Vec<i8> {
        match &self.panels {
            Panels::Quads { data, .. } => super::amx::unpack(data, self.n, self.k, NR),
            Panels::Pairs(d) => {
                let kp = self.kp();
                let mut b = vec![0i8; self.n * self.k];
                for (j, row) in b.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
                    let panel = &d[(j / NR) * kp * NR..];
                    for (kk, v) in row.iter_mut().enumerate() {
                        *v = panel[((kk / 2) * NR + j % NR) * 2 + kk % 2] as i8;
                    }
                }
                b
            }
        }
    }

    /// Bytes held by the packed panels.
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::Pairs(d) => d.len() * 2,
            Panels::Quads { data, colsum } => data.len() + 4 * colsum.len(),
        }
    }
}

/// Packs int8 weights `b` (`[n, k]`, row-major) into panels for this CPU's kernel.
pub fn pack(b: &[i8], n: usize, k: usize) -> Packed {
    pack_for(b, n, k, Isa::detect())
}

/// Packs int8 weights `b` (`[n, k]`, row-major) into panels for `isa`'s kernel.
pub fn pack_for(b: &[i8], n: usize, k: usize, isa: Isa) -> Packed {
    assert_eq!(b.len(), n * k, "pack: {} values for [{n}, {k}]", b.len());
    if matches!(isa, Isa::Amx | Isa::Avx512Vnni) {
        let colsum = b
            .chunks_exact(k.max(1))
            .take(n)
            .map(|row| row.iter().map(|&v| v as i32).sum())
            .collect();
        let data = super::amx::pack(b, n, k, NR);
        let panels = Panels::Quads { data, colsum };
        return Packed { n, k, panels };
    }
    let kp = k.next_multiple_of(2);
    let panels = n.div_ceil(NR);
    let mut data = vec![0i16; panels * kp * NR];
    data.par_chunks_mut(kp * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                let row = &b[(p * NR + j) * k..][..k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[((kk / 2) * NR + j) * 2 + kk % 2] = v as i16;
                }
            }
        });
    Packed {
        n,
        k,
        panels: Panels::Pairs(data),
    }
}

/// Activations `[m, k]` quantized per row to i16 values in `[-127, 127]`, rows padded to even
/// length, with one scale per row (`x ≈ q · scale`).
#[derive(Debug, Clone)]
pub struct QRows {
    pub m: usize,
    pub k: usize,
    pub q: Vec<i16>,
    pub scale: Vec<f32>,
    /// The static scale the rows were quantized with (`None`: each row by its own range).
    pub fixed: Option<f32>,
}

impl QRows {
    fn kp(&self) -> usize {
        self.k.next_multiple_of(2)
    }

    /// Returns the buffer to this thread's pool for the next [`quantize_rows`].
    pub fn recycle(self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < 2 {
                p.push(self.q);
            }
        });
    }
}

thread_local! {
    /// Activation buffers kept between layers.
    static POOL: std::cell::RefCell<Vec<Vec<i16>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Quantizes the rows of `x` (`[m, k]`): each row by its own max |x| / 127 (dynamic), or all
/// by `fixed` (static, values beyond the calibrated range clip).
pub fn quantize_rows(x: &[f32], m: usize, k: usize, fixed: Option<f32>) -> QRows {
    assert_eq!(
        x.len(),
        m * k,
        "quantize_rows: {} values for [{m}, {k}]",
        x.len()
    );
    let kp = k.next_multiple_of(2);
    let mut q = take_rows(m * kp);
    let mut scale = vec![0f32; m];
    if k == 0 {
        q.fill(0);
        return QRows {
            m,
            k,
            q,
            scale,
            fixed,
        };
    }
    x.par_chunks(k)
        .zip(q.par_chunks_mut(kp).zip(scale.par_iter_mut()))
        .with_min_len(16)
        .for_each(|(row, (dst, s))| *s = quantize_row(row, fixed, dst));
    QRows {
        m,
        k,
        q,
        scale,
        fixed,
    }
}

/// A buffer of `len` i16 values from the pool (see `QRows::recycle`), every one to be written
/// by the caller: a fresh multi-megabyte allocation costs a page fault per 4 KiB, more than
/// quantizing into it.
fn take_rows(len: usize) -> Vec<i16> {
    let mut q: Vec<i16> = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    q.clear();
    q.reserve(len);
    // SAFETY: i16 has no invalid bit patterns; callers write every value before reading.
    #[allow(clippy::uninit_vec)]
    unsafe {
        q.set_len(len)
    };
    q
}

/// Quantizes `row` into `dst` (its length rounded up to even; the padding is zeroed) by its
/// own max |x| / 127, or by `fixed`; returns the scale.
fn quantize_row(row: &[f32], fixed: Option<f32>, dst: &mut [i16]) -> f32 {
    let k = row.len();
    let sc = match fixed {
        Some(f) => f,
        None => max_abs(row) / 127.0,
    };
    if sc > 0.0 {
        round_row(row, 1.0 / sc, &mut dst[..k]);
    } else {
        dst[..k].fill(0);
    }
    dst[k..].fill(0);
    sc
}

// `max |x|`, vectorised.
// (`a = if v > a { v } else { a }` is one `vmaxps`; `f32::max`'s NaN rule is several
// instructions. Both skip NaN.)
dispatch!(max_abs(x: &[f32]) -> f32 {
    let mut m = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in m.iter_mut().zip(c) {
            let v = v.abs();
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |a, v| a.max(v.abs()));
    m.iter().fold(tail, |a, &v| a.max(v))
});

/// The f32 epilogue of one tile: `dst[r][j] = act(acc[r][j] · sa[r] · sw[j] (+ bias[j]))
/// (+ res[r][j])` for the tile's rows `r` and its `sw.len()` columns `j`.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    sw: &'a [f32],
    bias: Option<&'a [f32]>,
    gelu: bool,
    /// The residual's first value for the tile, and its row stride.
    res: Option<(&'a [f32], usize)>,
}

/// The epilogue's loops, compiled for the CPU's widest vectors up to AVX2 (chosen once per
/// product, see [`epilogue_fn`]). AVX2 at most: it runs between int8 tiles, 16 outputs at a
/// time, where short bursts of AVX-512 arithmetic made GELU 2.3 times slower in the int8
/// profile.
///
/// # Safety
/// `dst` is valid for writes of `tile.len()` rows of `e.sw.len()` values, `ldd` apart, that
/// no one else accesses meanwhile; `sa` has a scale per row; a residual holds the rows too.
#[inline(always)]
unsafe fn epilogue_imp(tile: &[[i32; NR]], sa: &[f32], e: Epilogue, dst: *mut f32, ldd: usize) {
    let nn = e.sw.len();
    for (r, acc) in tile.iter().enumerate() {
        // SAFETY: row r of the tile's output (caller's contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.add(r * ldd), nn) };
        let sa = sa[r];
        if let (NR, Some(b)) = (nn, e.bias) {
            let (sw, b): (&[f32; NR], &[f32; NR]) =
                (e.sw.try_into().expect("NR"), b.try_into().expect("NR"));
            let dst: &mut [f32; NR] = dst.try_into().expect("NR");
            for j in 0..NR {
                dst[j] = (acc[j] as f32 * sa).mul_add(sw[j], b[j]);
            }
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                let v = acc[j] as f32 * sa;
                *d = match e.bias {
                    Some(b) => v.mul_add(e.sw[j], b[j]),
                    None => v * e.sw[j],
                };
            }
        }
        if e.gelu {
            crate::model::vecmath::gelu_slice(dst);
        }
        if let Some((res, ld)) = e.res {
            for (d, &v) in dst.iter_mut().zip(&res[r * ld..][..nn]) {
                *d += v;
            }
        }
    }
}

type EpilogueFn = unsafe fn(&[[i32; NR]], &[f32], Epilogue, *mut f32, usize);

/// [`epilogue_imp`] for this CPU.
fn epilogue_fn() -> EpilogueFn {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return epilogue_avx2::run;
    }
    unsafe fn plain(tile: &[[i32; NR]], sa: &[f32], e: Epilogue, dst: *mut f32, ldd: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { epilogue_imp(tile, sa, e, dst, ldd) }
    }
    plain
}

/// The epilogue of full tiles (16 columns, with a bias) in AVX2 intrinsics: two vectors per
/// row, every constant in a register. The same operations in the same order as
/// [`epilogue_imp`] (GELU: `vecmath::avx2::gelu`), so the same bits. (Compiled from
/// the loops, the tile's epilogue and GELU ran at half this speed.)
#[cfg(target_arch = "x86_64")]
mod epilogue_avx2 {
    use super::{Epilogue, NR};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA present; the contract of [`super::epilogue_imp`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run(tile: &[[i32; NR]], sa: &[f32], e: Epilogue, dst: *mut f32, ldd: usize) {
        let Some(bias) = e.bias.filter(|_| e.sw.len() == NR) else {
            // SAFETY: forwarded from the caller.
            return unsafe { super::epilogue_imp(tile, sa, e, dst, ldd) };
        };
        assert!(sa.len() >= tile.len() && bias.len() == NR);
        if let Some((res, ld)) = e.res {
            assert!(tile.is_empty() || res.len() >= (tile.len() - 1) * ld + NR);
        }
        // SAFETY: 16 weight scales and biases (checked above); rows of `dst` and of the
        // residual as the caller guarantees and the assertion checked.
        unsafe {
            let sw = [
                _mm256_loadu_ps(e.sw.as_ptr()),
                _mm256_loadu_ps(e.sw.as_ptr().add(8)),
            ];
            let b = [
                _mm256_loadu_ps(bias.as_ptr()),
                _mm256_loadu_ps(bias.as_ptr().add(8)),
            ];
            for (r, acc) in tile.iter().enumerate() {
                let s = _mm256_set1_ps(sa[r]);
                for h in 0..2 {
                    let a = _mm256_cvtepi32_ps(_mm256_loadu_si256(
                        acc.as_ptr().add(8 * h) as *const __m256i
                    ));
                    let mut v = _mm256_fmadd_ps(_mm256_mul_ps(a, s), sw[h], b[h]);
                    if e.gelu {
                        v = crate::model::vecmath::avx2::gelu(v);
                    }
                    if let Some((res, ld)) = e.res {
                        v = _mm256_add_ps(v, _mm256_loadu_ps(res.as_ptr().add(r * ld + 8 * h)));
                    }
                    _mm256_storeu_ps(dst.add(r * ldd + 8 * h), v);
                }
            }
        }
    }
}

// `dst = round(x · inv)` clamped to `[-127, 127]`, ties to even.
dispatch!(round_row(x: &[f32], inv: f32, dst: &mut [i16]) {
    // Adding and subtracting 1.5·2^23 rounds to nearest even for |v| < 2^22, in a form
    // that vectorises (`f32::round_ties_even` becomes a libm call on baseline x86-64).
    const MAGIC: f32 = 12_582_912.0;
    for (d, &v) in dst.iter_mut().zip(x) {
        // `max`/`min` rather than `clamp`, so that NaN becomes -127 rather than NaN.
        #[allow(clippy::manual_clamp)]
        let v = (v * inv).max(-127.0).min(127.0);
        // SAFETY: v is finite and within [-127, 127] (NaN was replaced above).
        *d = unsafe { ((v + MAGIC) - MAGIC).to_int_unchecked::<i32>() } as i16;
    }
});

/// The i32 product `A·Bᵀ` (`[m, n]`) of int8 rows `a` (`[m, k]`) and packed weights.
pub fn gemm_i32(a: &[i8], m: usize, b: &Packed) -> Vec<i32> {
    gemm_i32_with(a, m, b, Isa::detect())
}

/// As [`gemm_i32`] with a chosen instruction set (tests run every one).
pub fn gemm_i32_with(a: &[i8], m: usize, b: &Packed, isa: Isa) -> Vec<i32> {
    let b = &*b.for_isa(isa);
    let (k, kp) = (b.k, b.kp());
    assert_eq!(a.len(), m * k, "gemm: {} values for [{m}, {k}]", a.len());
    let mut q = vec![0i16; m * kp];
    for (dst, src) in q.chunks_exact_mut(kp).zip(a.chunks_exact(k.max(1))) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as i16;
        }
    }
    let mut out = vec![0i32; m * b.n];
    let ptr = SendPtr(out.as_mut_ptr());
    let emit = |i0: usize, p: usize, tile: &[[i32; NR]]| {
        let nn = NR.min(b.n - p * NR);
        for (r, acc) in tile.iter().enumerate() {
            // SAFETY: tile (i0.., p) owns rows i0..i0+mm, columns p·NR..p·NR+nn of `out`.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(ptr.at((i0 + r) * b.n + p * NR), nn) };
            dst.copy_from_slice(&acc[..nn]);
        }
    };
    tiles(m, b.n, emit, &|_, _| {}, &q, kp, b, isa);
    out
}

/// An element-wise function applied to the output in the GEMM's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    None,
    /// The exact (erf) GELU.
    Gelu,
}

/// `y[m, n] = (Aq·Bᵀ) · sa[i] · sw[j] + bias[j]`: the f32 result of a quantized linear layer.
pub fn gemm_f32(a: &QRows, b: &Packed, sw: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    gemm_f32_act(a, b, sw, bias, Act::None)
}

/// [`gemm_f32`] followed by `act`, applied to each tile while it is in cache.
pub fn gemm_f32_act(a: &QRows, b: &Packed, sw: &[f32], bias: Option<&[f32]>, act: Act) -> Vec<f32> {
    gemm_f32_fused(a, b, sw, bias, act, None)
}

fn check(a: &QRows, b: &Packed, sw: &[f32], bias: Option<&[f32]>) {
    assert_eq!(
        a.k, b.k,
        "gemm: activations of width {} for weights of width {}",
        a.k, b.k
    );
    assert_eq!(
        sw.len(),
        b.n,
        "gemm: {} weight scales for {} outputs",
        sw.len(),
        b.n
    );
    if let Some(bias) = bias {
        assert_eq!(
            bias.len(),
            b.n,
            "gemm: {} biases for {} outputs",
            bias.len(),
            b.n
        );
    }
}

/// `act(A·Bᵀ · sa · sw + bias) + residual` (`residual`: `[m, n]`), all in the epilogue, on
/// each tile while it is in cache: a residual block's product and its skip connection in one
/// pass over the output.
pub fn gemm_f32_fused(
    a: &QRows,
    b: &Packed,
    sw: &[f32],
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    gemm_f32_rows(a, b, sw, bias, act, residual, RowPost::default()).0
}

/// Steps on each whole row of a product's output, after its epilogue.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowPost<'a> {
    /// Layer norm of the row: its weight, bias and epsilon.
    pub norm: Option<(&'a [f32], &'a [f32], f32)>,
    /// Also quantize the (normalized) row for the next int8 layer, by `Some(fixed)` (static)
    /// or its own range (`None`), as [`quantize_rows`] would.
    pub quantize: Option<Option<f32>>,
}

/// [`gemm_f32_fused`], then `post` on each row of the output: in the task that computed the
/// row, while it is in cache, when tasks hold whole rows; else in a pass after the product.
/// Returns the output and, with `post.quantize`, its int8 rows.
pub fn gemm_f32_rows(
    a: &QRows,
    b: &Packed,
    sw: &[f32],
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<&[f32]>,
    post: RowPost,
) -> (Vec<f32>, Option<QRows>) {
    check(a, b, sw, bias);
    let isa = Isa::detect();
    let b = &*b.for_isa(isa);
    let (m, n) = (a.m, b.n);
    if let Some(r) = residual {
        assert_eq!(
            r.len(),
            m * n,
            "gemm: residual of {} values for [{m}, {n}]",
            r.len()
        );
    }
    if let Some((w, bn, _)) = post.norm {
        assert!(
            w.len() == n && bn.len() == n,
            "gemm: a layer norm of {} and {} values for rows of {n}",
            w.len(),
            bn.len()
        );
    }
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: every element is written by exactly one tile below before it is read.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(m * n)
    };
    let np = n.next_multiple_of(2);
    let mut q = post.quantize.map(|_| take_rows(m * np));
    let mut scale = vec![0f32; if q.is_some() { m } else { 0 }];
    let ptr = SendPtr(out.as_mut_ptr());
    let (qp, sp) = (
        SendPtr(q.as_mut().map_or(std::ptr::null_mut(), |q| q.as_mut_ptr())),
        SendPtr(scale.as_mut_ptr()),
    );
    // `post` on rows r0..r0+rows, by the one task or thread that owns them.
    let rows_post = move |r0: usize, rows: usize| {
        for i in r0..r0 + rows {
            // SAFETY: the caller owns rows r0..r0+rows of `out` (and of the int8 rows).
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.at(i * n), n) };
            if let Some((w, bn, eps)) = post.norm {
                crate::model::layer_norm::normalize_in_place(row, w, bn, eps);
            }
            if let Some(fixed) = post.quantize {
                // SAFETY: as above.
                let (dst, s) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qp.at(i * np), np),
                        &mut *sp.at(i),
                    )
                };
                *s = quantize_row(row, fixed, dst);
            }
        }
    };
    let active = post.norm.is_some() || post.quantize.is_some();
    let in_tasks = active && !splits_panels(m, task_rows(isa)) && n > 0;
    let epi = epilogue_fn();
    tiles(
        m,
        n,
        |i0, p, tile: &[[i32; NR]]| {
            let j0 = p * NR;
            let nn = NR.min(n - j0);
            let e = Epilogue {
                sw: &sw[j0..j0 + nn],
                bias: bias.map(|b| &b[j0..j0 + nn]),
                gelu: act == Act::Gelu,
                res: residual.map(|r| (&r[i0 * n + j0..], n)),
            };
            // SAFETY: tile (i0.., p) owns rows i0..i0+mm, columns j0..j0+nn of `out`; the
            // residual has `out`'s shape.
            unsafe { epi(tile, &a.scale[i0..], e, ptr.at(i0 * n + j0), n) };
        },
        &|r0, rows| {
            if in_tasks {
                rows_post(r0, rows);
            }
        },
        &a.q,
        a.kp(),
        b,
        isa,
    );
    if active && !in_tasks && n > 0 {
        (0..m)
            .into_par_iter()
            .with_min_len(16)
            .for_each(|i| rows_post(i, 1));
    }
    let q = post.quantize.zip(q).map(|(fixed, q)| QRows {
        m,
        k: n,
        q,
        scale,
        fixed,
    });
    (out, q)
}

/// `act(A·Bᵀ · sa · sw + bias)` quantized per row for the next layer (as [`quantize_rows`]
/// with `fixed` would quantize it): the f32 output of a hidden layer that only feeds another
/// int8 layer never leaves the cache. Each task's rows are kept in a per-thread block, and
/// quantized once the task has all their columns. The same values as [`gemm_f32_act`] then
/// [`quantize_rows`].
pub fn gemm_requantize(
    a: &QRows,
    b: &Packed,
    sw: &[f32],
    bias: Option<&[f32]>,
    act: Act,
    fixed: Option<f32>,
) -> QRows {
    check(a, b, sw, bias);
    let isa = Isa::detect();
    let b = &*b.for_isa(isa);
    let (m, n) = (a.m, b.n);
    let block = task_rows(isa);
    if splits_panels(m, block) || n == 0 {
        // Tasks would hold only some of a row's columns: quantize the whole output after.
        let y = gemm_f32_act(a, b, sw, bias, act);
        return quantize_rows(&y, m, n, fixed);
    }
    let np = n.next_multiple_of(2);
    let mut q = take_rows(m * np);
    let mut scale = vec![0f32; m];
    let (qp, sp) = (SendPtr(q.as_mut_ptr()), SendPtr(scale.as_mut_ptr()));
    let epi = epilogue_fn();
    tiles(
        m,
        n,
        |i0, p, tile: &[[i32; NR]]| {
            let j0 = p * NR;
            let nn = NR.min(n - j0);
            // Rows relative to the task's first row (tasks start at multiples of `block`).
            let base = i0 / block * block;
            TASK_OUT.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.resize(block * n, 0.0);
                let e = Epilogue {
                    sw: &sw[j0..j0 + nn],
                    bias: bias.map(|b| &b[j0..j0 + nn]),
                    // The activation waits for the whole block (below).
                    gelu: false,
                    res: None,
                };
                let dst = &mut buf[(i0 - base) * n + j0..];
                assert!(dst.len() >= (tile.len() - 1) * n + nn);
                // SAFETY: the rows fit in this thread's block (checked above).
                unsafe { epi(tile, &a.scale[i0..], e, dst.as_mut_ptr(), n) };
            });
        },
        &|r0, rows| {
            TASK_OUT.with(|buf| {
                let mut buf = buf.borrow_mut();
                if act == Act::Gelu {
                    // The whole block at once: one long run of AVX-512 arithmetic (where the
                    // CPU has it) rather than a short one per tile, 1.1× faster at batch 32
                    // (`vecmath::gelu`'s lanes give the loop's bits).
                    crate::model::vecmath::gelu_in_place(&mut buf[..rows * n]);
                }
                for (r, row) in buf.chunks_exact(n).take(rows).enumerate() {
                    // SAFETY: the task that owns rows r0..r0+rows (all their columns) is the
                    // only writer of their quantized values and scales.
                    let (dst, s) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(qp.at((r0 + r) * np), np),
                            &mut *sp.at(r0 + r),
                        )
                    };
                    *s = quantize_row(row, fixed, dst);
                }
            });
        },
        &a.q,
        a.kp(),
        b,
        isa,
    );
    QRows {
        m,
        k: n,
        q,
        scale,
        fixed,
    }
}

thread_local! {
    /// The f32 rows of [`gemm_requantize`]'s current task.
    static TASK_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: tiles write disjoint regions.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn at(self, off: usize) -> *mut T {
        self.0.wrapping_add(off)
    }
}

/// The instruction set of the micro-kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (any CPU).
    Portable,
    /// x86-64 AVX2 (`vpmaddwd`).
    Avx2,
    /// x86-64 AVX-512 VNNI (`vpdpbusd` on bytes: 64 products per instruction; activations
    /// shifted to unsigned, the weights' sums subtracted after).
    Avx512Vnni,
    /// x86-64 AMX int8 (`tdpbssd` on 16×64 tiles, [`super::amx`]).
    Amx,
}

impl Isa {
    /// The best kernel this CPU runs, or the one `WICK_INT8_KERNEL` (`amx`, `vnni`, `avx2`,
    /// `portable`) names if this CPU runs it, e.g. to compare kernels.
    pub fn detect() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::best();
            let wanted = match std::env::var("WICK_INT8_KERNEL").as_deref() {
                Ok("amx") => Isa::Amx,
                Ok("vnni") => Isa::Avx512Vnni,
                Ok("avx2") => Isa::Avx2,
                Ok("portable") => Isa::Portable,
                _ => return best,
            };
            if Isa::available().contains(&wanted) {
                wanted
            } else {
                best
            }
        })
    }

    fn best() -> Isa {
        if super::amx::available() {
            return Isa::Amx;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every kernel this CPU can run (for tests).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                v.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx512Vnni);
            }
        }
        if super::amx::available() {
            v.push(Isa::Amx);
        }
        v
    }
}

/// Rows per task: a block of micro-tiles sharing one pass over a weight panel.
const ROW_BLOCK: usize = 8 * MR;

/// Runs `task(first_row, units)` for every block of `block` rows × group of `units` (panels,
/// or panel pairs), in parallel when the product (`work` multiply-adds) is worth it. With few
/// row blocks (a batch of one) the units are split into groups too, so that every core works.
/// The tasks depend only on the shapes, so results do not depend on the thread count.
fn schedule(
    m: usize,
    units: usize,
    block: usize,
    work: usize,
    task: impl Fn(usize, std::ops::Range<usize>) + Sync,
) {
    let group = if splits_panels(m, block) {
        units.div_ceil(8).max(1)
    } else {
        units
    };
    let row_blocks = m.div_ceil(block);
    let groups = units.div_ceil(group);
    let run = |t: usize| {
        let (rb, g) = (t / groups, t % groups);
        task(rb * block, g * group..((g + 1) * group).min(units));
    };
    let tasks = row_blocks * groups;
    if tasks > 1 && work >= 1 << 16 && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Whether [`schedule`] splits the panels of `m` rows into groups (few row blocks), so that
/// a task no longer holds all the columns of its rows.
fn splits_panels(m: usize, block: usize) -> bool {
    m.div_ceil(block) < 4
}

/// The rows of a task of [`tiles`] on `isa` (tasks start at multiples of it).
fn task_rows(isa: Isa) -> usize {
    match isa {
        Isa::Amx => super::amx::BM,
        _ => ROW_BLOCK,
    }
}

/// Runs the micro-kernel over every (row block, panel) tile, in parallel, handing each
/// result to `emit(first_row, panel, rows)` (`rows`: up to `MR` rows of `NR` sums; up to
/// `amx::BM` with AMX). Each task ends with `finish(first_row, rows)` on its thread.
#[allow(clippy::too_many_arguments)]
fn tiles<F>(
    m: usize,
    n: usize,
    emit: F,
    finish: &Finish<'_>,
    a: &[i16],
    lda: usize,
    b: &Packed,
    isa: Isa,
) where
    F: Fn(usize, usize, &[[i32; NR]]) + Sync,
{
    if m == 0 || n == 0 {
        return;
    }
    if let Panels::Quads { data, colsum } = &b.panels {
        return match isa {
            Isa::Amx => amx_tiles(m, n, emit, finish, a, lda, b.k, data),
            Isa::Avx512Vnni => byte_tiles(m, n, emit, finish, a, lda, b.k, data, colsum),
            _ => unreachable!("quad-packed weights go to the AMX or VNNI byte kernel"),
        };
    }
    let kp2 = b.kp() / 2;
    schedule(m, n.div_ceil(NR), ROW_BLOCK, m * n * b.k, |r0, panels| {
        let r1 = (r0 + ROW_BLOCK).min(m);
        for p in panels {
            let panel = b.panel(p);
            let mut i0 = r0;
            while i0 < r1 {
                let mm = MR.min(r1 - i0);
                let mut rows = [0usize; MR];
                for (r, slot) in rows.iter_mut().enumerate() {
                    *slot = (i0 + r.min(mm - 1)) * lda;
                }
                let mut acc = [[0i32; NR]; MR];
                kernel(isa, a, &rows, mm, panel, kp2, &mut acc);
                emit(i0, p, &acc[..mm]);
                i0 += mm;
            }
        }
        finish(r0, r1 - r0);
    });
}

/// The end of a task of [`tiles`]: `(first_row, rows)`.
type Finish<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// [`tiles`] on AMX: tasks of [`amx::BM`] rows (narrowed to i8 once) × a group of panel
/// pairs, each pair one `amx::block`.
#[allow(clippy::too_many_arguments)]
fn amx_tiles<F>(
    m: usize,
    n: usize,
    emit: F,
    finish: &Finish<'_>,
    a: &[i16],
    lda: usize,
    k: usize,
    data: &[i8],
) where
    F: Fn(usize, usize, &[[i32; NR]]) + Sync,
{
    use super::amx::{self, BM};
    let kq = amx::kq(k);
    let panels = n.div_ceil(NR);
    let panel = |p: usize| &data[p * kq * NR..(p + 1) * kq * NR];
    schedule(m, amx::panels(n, NR) / 2, BM, m * n * k, |i0, pairs| {
        let mm = BM.min(m - i0);
        AMX_ROWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(BM * kq, 0);
            amx::narrow_rows(a, lda, m, k, i0, &mut buf);
            let mut c = [[[0i32; NR]; BM]; 2];
            amx::with_tiles(|| {
                for q in pairs {
                    amx::block(&buf, panel(2 * q), panel(2 * q + 1), kq, &mut c);
                    for (h, tile) in c.iter().enumerate() {
                        if 2 * q + h < panels {
                            emit(i0, 2 * q + h, &tile[..mm]);
                        }
                    }
                }
            });
        });
        finish(i0, mm);
    });
}

/// [`tiles`] with `vpdpbusd`: tasks of [`ROW_BLOCK`] rows, shifted once to unsigned bytes
/// (`a + 128`) into a zero-padded block, × a group of panels; each `MR × NR` micro-tile's sums
/// are corrected by `128 · Σ_k b[j][k]`, which makes them exactly `Σ a·b`.
#[allow(clippy::too_many_arguments)]
fn byte_tiles<F>(
    m: usize,
    n: usize,
    emit: F,
    finish: &Finish<'_>,
    a: &[i16],
    lda: usize,
    k: usize,
    data: &[i8],
    colsum: &[i32],
) where
    F: Fn(usize, usize, &[[i32; NR]]) + Sync,
{
    #[cfg(target_arch = "x86_64")]
    assert!(
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni"),
        "the VNNI byte kernel needs AVX-512 VNNI"
    );
    let kq = super::amx::kq(k);
    schedule(m, n.div_ceil(NR), ROW_BLOCK, m * n * k, |i0, panels| {
        let rows = ROW_BLOCK.min(m - i0);
        BYTE_ROWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(ROW_BLOCK * kq, 0);
            for (r, row) in buf.chunks_exact_mut(kq).enumerate().take(rows) {
                for (d, &v) in row.iter_mut().zip(&a[(i0 + r) * lda..][..k]) {
                    *d = (v + 128) as u8;
                }
                row[k..].fill(0);
            }
            for p in panels {
                let panel = &data[p * kq * NR..(p + 1) * kq * NR];
                let sums: [i32; NR] =
                    std::array::from_fn(|j| 128 * colsum.get(p * NR + j).copied().unwrap_or(0));
                let mut r0 = 0;
                while r0 < rows {
                    let mm = MR.min(rows - r0);
                    let mut acc = [[0i32; NR]; MR];
                    byte_kernel(&buf[r0 * kq..(r0 + mm) * kq], kq, mm, panel, &mut acc);
                    for row in acc.iter_mut().take(mm) {
                        for (v, s) in row.iter_mut().zip(&sums) {
                            *v -= s;
                        }
                    }
                    emit(i0 + r0, p, &acc[..mm]);
                    r0 += mm;
                }
            }
        });
        finish(i0, rows);
    });
}

/// The byte micro-kernel over `mm` rows of `a` (`[mm][kq]` u8) and a quad panel. Its caller
/// ([`byte_tiles`]) has checked that the CPU has AVX-512 VNNI.
fn byte_kernel(a: &[u8], kq: usize, mm: usize, panel: &[i8], acc: &mut [[i32; NR]; MR]) {
    assert!(a.len() >= mm * kq && panel.len() >= kq * NR && kq.is_multiple_of(4));
    #[cfg(target_arch = "x86_64")]
    {
        let (a, b) = (a.as_ptr(), panel.as_ptr());
        // SAFETY: AVX-512 VNNI checked by the caller; `mm` rows of `kq` bytes and a panel of
        // `kq·NR` bytes, checked above.
        unsafe {
            match mm {
                1 => vnni::kernel::<1>(a, kq, b, acc),
                2 => vnni::kernel::<2>(a, kq, b, acc),
                3 => vnni::kernel::<3>(a, kq, b, acc),
                4 => vnni::kernel::<4>(a, kq, b, acc),
                5 => vnni::kernel::<5>(a, kq, b, acc),
                _ => vnni::kernel::<MR>(a, kq, b, acc),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the VNNI byte kernel is x86-64 only ({mm} rows, {kq})");
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `acc[r][j] = Σ_k a[r][k] · B[j][k]` (`a` unsigned bytes, rows of `kq`; `B` one quad
    /// panel): per `k` quad, one panel load and a `vpdpbusd` per row against the row's four
    /// bytes broadcast.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn kernel<const M: usize>(
        a: *const u8,
        kq: usize,
        b: *const i8,
        acc: &mut [[i32; NR]; MR],
    ) {
        let mut c = [_mm512_setzero_si512(); M];
        // SAFETY: the caller guarantees M rows of kq bytes at `a` and kq·NR bytes at `b`.
        unsafe {
            for t in 0..kq / 4 {
                let bv = _mm512_loadu_si512(b.add(t * 4 * NR) as *const __m512i);
                for (r, c) in c.iter_mut().enumerate() {
                    let av =
                        _mm512_set1_epi32((a.add(r * kq + 4 * t) as *const i32).read_unaligned());
                    *c = _mm512_dpbusd_epi32(*c, av, bv);
                }
            }
            for (dst, c) in acc.iter_mut().zip(&c) {
                _mm512_storeu_si512(dst.as_mut_ptr() as *mut __m512i, *c);
            }
        }
    }
}

thread_local! {
    /// The unsigned byte rows of the VNNI byte kernel's current task.
    static BYTE_ROWS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The i8 rows of the AMX kernel's current task.
    static AMX_ROWS: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The micro-kernel over the first `mm` of `rows`.
fn kernel(
    isa: Isa,
    a: &[i16],
    rows: &[usize; MR],
    mm: usize,
    panel: &[i16],
    kp2: usize,
    acc: &mut [[i32; NR]; MR],
) {
    for &r in rows {
        assert!(r + 2 * kp2 <= a.len(), "gemm: activation rows out of range");
    }
    assert!(panel.len() >= kp2 * 2 * NR, "gemm: panel out of range");
    // The kernel instantiated for the tile's row count (a partial tile computes only its rows).
    #[cfg(target_arch = "x86_64")]
    macro_rules! by_rows {
        ($m:ident) => {{
            let (a, b) = (a.as_ptr(), panel.as_ptr());
            match mm {
                1 => $m::kernel::<1>(a, rows, b, kp2, acc),
                2 => $m::kernel::<2>(a, rows, b, kp2, acc),
                3 => $m::kernel::<3>(a, rows, b, kp2, acc),
                4 => $m::kernel::<4>(a, rows, b, kp2, acc),
                5 => $m::kernel::<5>(a, rows, b, kp2, acc),
                _ => $m::kernel::<MR>(a, rows, b, kp2, acc),
            }
        }};
    }
    match isa {
        // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2; bounds checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { by_rows!(avx2) },
        _ => portable_kernel(a, rows, panel, kp2, acc),
    }
}

fn portable_kernel(
    a: &[i16],
    rows: &[usize; MR],
    panel: &[i16],
    kp2: usize,
    acc: &mut [[i32; NR]; MR],
) {
    for t in 0..kp2 {
        let b = &panel[t * 2 * NR..][..2 * NR];
        for (r, &row) in rows.iter().enumerate() {
            let (a0, a1) = (a[row + 2 * t] as i32, a[row + 2 * t + 1] as i32);
            for j in 0..NR {
                acc[r][j] += a0 * b[2 * j] as i32 + a1 * b[2 * j + 1] as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `acc[r][j] = Σ_k a[rows[r] + k] · B[j][k]` over `2·kp2` values of `k`, for the first
    /// `M` rows (a partial tile computes only the rows it has).
    #[target_feature(enable = "avx2")]
    pub unsafe fn kernel<const M: usize>(
        a: *const i16,
        rows: &[usize; MR],
        b: *const i16,
        kp2: usize,
        acc: &mut [[i32; NR]; MR],
    ) {
        const NV: usize = NR / 8;
        let z = _mm256_setzero_si256();
        let mut c = [[z; NV]; M];
        let ap: [*const i32; M] = std::array::from_fn(|r| a.add(rows[r]) as *const i32);
        let step = |c: &mut [[__m256i; NV]; M], t: usize| {
            let bv: [__m256i; NV] = std::array::from_fn(|v| {
                _mm256_loadu_si256(b.add(t * 2 * NR + 16 * v) as *const __m256i)
            });
            for r in 0..M {
                let av = _mm256_set1_epi32(ap[r].add(t).read_unaligned());
                for v in 0..NV {
                    c[r][v] = _mm256_add_epi32(c[r][v], _mm256_madd_epi16(av, bv[v]));
                }
            }
        };
        super::unrolled_by_two(kp2, |t| step(&mut c, t));
        for (dst, c) in acc.iter_mut().zip(&c) {
            for (v, cv) in c.iter().enumerate() {
                _mm256_storeu_si256(dst.as_mut_ptr().add(8 * v) as *mut __m256i, *cv);
            }
        }
    }
}

/// Calls `step(t)` for `t` in `0..n`, two per loop iteration: less loop overhead between the
/// micro-kernels' multiply-adds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn unrolled_by_two(n: usize, mut step: impl FnMut(usize)) {
    let mut t = 0;
    while t + 1 < n {
        step(t);
        step(t + 1);
        t += 2;
    }
    if t < n {
        step(t);
    }
}

/// Scalar reference: `C[i][j] = Σ_k a[i][k] · b[j][k]` in i32.
pub fn reference(a: &[i8], b: &[i8], m: usize, n: usize, k: usize) -> Vec<i32> {
    let mut c = vec![0i32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|kk| a[i * k + kk] as i32 * b[j * k + kk] as i32)
                .sum();
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_avx2_epilogue_gives_the_plain_loops_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let mut r = crate::rng::Rng::new(31);
            let mut f = |n: usize, s: f64| -> Vec<f32> {
                (0..n).map(|_| (r.normal() * s) as f32).collect()
            };
            let rows = 32;
            let (sa, sw, bias, res) = (f(rows, 1e-3), f(NR, 1e-3), f(NR, 1.0), f(rows * NR, 2.0));
            let acc = f(rows * NR, 1e5);
            let mut tile = vec![[0i32; NR]; rows];
            for (t, a) in tile.iter_mut().flatten().zip(&acc) {
                *t = *a as i32;
            }
            // Extremes: zero, the largest sums, and values where GELU saturates.
            tile[0] = [0; NR];
            tile[1][..4].copy_from_slice(&[i32::MAX, i32::MIN, 1, -1]);
            for gelu in [false, true] {
                for residual in [false, true] {
                    let e = Epilogue {
                        sw: &sw,
                        bias: Some(&bias),
                        gelu,
                        res: residual.then_some((&res[..], NR)),
                    };
                    let (mut want, mut got) = (vec![0f32; rows * NR], vec![0f32; rows * NR]);
                    // SAFETY: `rows` rows of NR values each, NR apart; AVX2 and FMA checked.
                    unsafe {
                        epilogue_imp(&tile, &sa, e, want.as_mut_ptr(), NR);
                        epilogue_avx2::run(&tile, &sa, e, got.as_mut_ptr(), NR);
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "gelu {gelu}, residual {residual}");
                }
            }
        }
    }
}
