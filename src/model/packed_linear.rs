//! A linear layer's forward pass (`y = x·Wᵀ + b`) on weights packed once, for inference.
//!
//! The general f32 product ([`super::kernels::gemm_tiled`], the `gemm` crate) packs both
//! operands on every call: the weights are repacked for each block of rows of every batch, and
//! a separate pass writes the bias. A frozen layer's weights do not change, so this packs them
//! once (kept by [`crate::model::ParamStore::derived`]) into panels of [`NR`] = 64 output
//! channels, `[k][64]`, and runs an AVX-512 micro-kernel of [`MR`] = 6 rows × 64 columns: 24
//! accumulators that start from the bias, four panel loads and six broadcasts per `k`, 24
//! FMAs (attention's products use the same kernel 12 rows × 32 columns wide, [`mr`]). Full
//! 6 × 64 tiles run their steps of `k` in inline assembly, eight at a time, with the
//! prefetches' bookkeeping once per eight steps: 3–28% faster than the compiler's loop of the
//! same FMAs (the most when the machine is busy), in the same order, so the same bits. The rows
//! are read where they are (row streams at stride `k`; packing them cost 10% of the kernel's
//! time), and each tile prefetches the outputs and the rows of the next. A task is a block of
//! up to 96 rows against a group of panels, taken 128 columns at a time and `k` in blocks of
//! 128, so that a block of a panel (32 KiB) stays in L1 across the row tiles and their outputs
//! in L2; a short batch (a single sequence) splits the panels into more groups, so that both
//! cores get several tasks.
//!
//! The output tiles and each value's order of operations (one FMA chain over `k`, from the
//! bias) depend only on the shapes, so the result is the same for any thread count. It differs
//! from the `gemm` crate's in the last bits (another summation order). Only CPUs with AVX-512F
//! use it ([`PackedLinear::new`] returns `None` elsewhere, and callers keep the general path).

use rayon::prelude::*;

use candle_core::{DType, Tensor};

use super::kernels::{with_f32, DstPtr};

/// Output channels of a linear layer's panel (four AVX-512 registers): 6 × 64 micro-tiles.
pub const NR: usize = 64;
/// Rows of a micro-tile of `NV` registers wide (24 accumulators).
pub const fn mr(nv: usize) -> usize {
    24 / nv
}
/// Rows of the linear layers' micro-tile.
pub const MR: usize = mr(NR / 16);
/// `k` values per block (a block of a panel, 16–32 KiB, stays in L1 across the task's tiles).
const KC: usize = 128;
/// Rows per task, at most (every panel block of the task serves them all).
const ROWS_PER_TASK: usize = 96;
/// Output columns a task runs through all of `k` before the next ones (they stay in L2).
const COLS_PER_PASS: usize = 128;

/// Weights `[n, k]` packed in panels of [`NR`] output channels (`[k][NR]`, zero-padded), and
/// the bias.
#[derive(Debug)]
pub struct PackedLinear {
    pub n: usize,
    pub k: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedLinear {
    /// Packs `w` (`[n, k]`, PyTorch's layout) and `bias` (`n` values; zeros when `None`).
    /// `None` on a CPU without AVX-512F.
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Option<Self> {
        if !available() {
            return None;
        }
        assert_eq!(
            w.len(),
            n * k,
            "packed linear: {} values for [{n}, {k}]",
            w.len()
        );
        let np = n.div_ceil(NR);
        let mut panels = Vec::new();
        pack_nk::<{ NR / 16 }>(w, k, n, k, &mut panels);
        let mut b = vec![0f32; np * NR];
        if let Some(bias) = bias {
            assert_eq!(
                bias.len(),
                n,
                "packed linear: {} biases for {n} outputs",
                bias.len()
            );
            b[..n].copy_from_slice(bias);
        }
        Some(Self {
            n,
            k,
            panels,
            bias: b,
        })
    }

    /// `x·Wᵀ + b` over the last dimension of `x` (any leading shape), with no gradient.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply_with(x, false, None)
    }

    /// [`Self::apply`], then GELU if `gelu`, then `+ residual` (the output's shape) if given,
    /// both on each tile of outputs while it is in cache: the values of the separate ops.
    pub fn apply_with(
        &self,
        x: &Tensor,
        gelu: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.apply_norm(x, gelu, residual, None)
    }

    /// [`Self::apply_with`], then a layer norm of each output row (weight, bias, epsilon), in
    /// the task that computed the row while it is in cache: the values of
    /// [`super::layer_norm::layer_norm`] on the output.
    pub fn apply_norm(
        &self,
        x: &Tensor,
        gelu: bool,
        residual: Option<&Tensor>,
        norm: Option<(&Tensor, &Tensor, f64)>,
    ) -> candle_core::Result<Tensor> {
        let k = *x.dims().last().unwrap_or(&0);
        if k != self.k || k == 0 {
            candle_core::bail!(
                "linear: input {:?} for weights [{}, {}]",
                x.dims(),
                self.n,
                self.k
            );
        }
        let x = x.contiguous()?;
        let m = x.elem_count() / k;
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("k > 0") = self.n;
        let residual = match residual {
            Some(r) if r.dims() != shape.as_slice() => {
                candle_core::bail!("linear: residual {:?} for an output {:?}", r.dims(), shape)
            }
            Some(_) if gelu => candle_core::bail!("linear: GELU and a residual together"),
            Some(r) => Some(r.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let norm = match norm {
            Some((w, b, _)) if w.elem_count() != self.n || b.elem_count() != self.n => {
                candle_core::bail!(
                    "linear: a layer norm of {:?} and {:?} for rows of {}",
                    w.dims(),
                    b.dims(),
                    self.n
                )
            }
            Some((w, b, eps)) => Some((host(w)?, host(b)?, eps as f32)),
            None => None,
        };
        let norm = norm
            .as_ref()
            .map(|(w, b, eps)| (w.as_slice(), b.as_slice(), *eps));
        let run = |xv: &[f32]| -> candle_core::Result<Vec<f32>> {
            Ok(match &residual {
                None if gelu => self.forward_rows(xv, m, Epilogue::Gelu, norm),
                None => self.forward_rows(xv, m, Epilogue::None, norm),
                Some(r) => {
                    match with_f32(r, |rv| self.forward_rows(xv, m, Epilogue::Add(rv), norm)) {
                        Some(y) => y,
                        None => self.forward_rows(xv, m, Epilogue::Add(&host(r)?), norm),
                    }
                }
            })
        };
        let y = match with_f32(&x, run) {
            Some(y) => y?,
            None => run(&host(&x)?)?,
        };
        Tensor::from_vec(y, shape, x.device())
    }

    /// `x·Wᵀ + b` for the `m` rows of `x` (`[m, k]`): `[m, n]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.forward_with(x, m, Epilogue::None)
    }

    /// [`Self::forward`], then `epilogue` on each output.
    pub fn forward_with(&self, x: &[f32], m: usize, epilogue: Epilogue) -> Vec<f32> {
        self.forward_rows(x, m, epilogue, None)
    }

    /// [`Self::forward_with`], then a layer norm (weight, bias, epsilon) of each output row:
    /// by the task that computed the row, when tasks hold whole rows, else in a pass after.
    pub fn forward_rows(
        &self,
        x: &[f32],
        m: usize,
        epilogue: Epilogue,
        norm: Option<(&[f32], &[f32], f32)>,
    ) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(
            x.len(),
            m * k,
            "packed linear: {} values for [{m}, {k}]",
            x.len()
        );
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: every element is written by exactly one tile below before it is read.
        #[allow(clippy::uninit_vec)]
        unsafe {
            out.set_len(m * n)
        };
        if m == 0 || n == 0 {
            return out;
        }
        let panels = n.div_ceil(NR);
        let tiles = m.div_ceil(MR);
        // Blocks of at most ROWS_PER_TASK rows, of equal size; with few of them (a short
        // batch), the panels are split into groups too, so that every core has several tasks.
        let row_blocks = tiles.div_ceil(ROWS_PER_TASK / MR);
        let tiles_per_block = tiles.div_ceil(row_blocks);
        let row_blocks = tiles.div_ceil(tiles_per_block);
        let want = 4 * rayon::current_num_threads().max(1);
        let groups = if row_blocks >= want {
            1
        } else {
            want.div_ceil(row_blocks).min(panels)
        };
        let group = panels.div_ceil(groups);
        let groups = panels.div_ceil(group);
        if let Some((w, b, _)) = norm {
            assert!(
                w.len() == n && b.len() == n,
                "packed linear: a layer norm of {} and {} values for rows of {n}",
                w.len(),
                b.len()
            );
        }
        let dst = DstPtr(out.as_mut_ptr());
        // The norm of rows r0..r1, by the one task or thread that owns them.
        let normalize = |r0: usize, r1: usize| {
            if let Some((w, b, eps)) = norm {
                for i in r0..r1 {
                    // SAFETY: the caller owns rows r0..r1 of `out`, all of whose outputs are
                    // final.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.at(i * n), n) };
                    super::layer_norm::normalize_in_place(row, w, b, eps);
                }
            }
        };
        let task = |t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let r0 = rb * tiles_per_block * MR;
            let r1 = (r0 + tiles_per_block * MR).min(m);
            let (p0, p1) = (g * group, ((g + 1) * group).min(panels));
            // SAFETY: this task owns rows r0..r1, panels p0..p1 of `out`.
            unsafe {
                block::<{ NR / 16 }>(
                    x,
                    k,
                    r0..r1,
                    k,
                    &self.panels,
                    p0..p1,
                    n,
                    Some(&self.bias),
                    dst,
                    n,
                    epilogue,
                )
            };
            if groups == 1 {
                normalize(r0, r1);
            }
        };
        let tasks = row_blocks * groups;
        let parallel = tasks > 1 && rayon::current_num_threads() > 1 && m * n * k >= 1 << 18;
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
        if groups > 1 && norm.is_some() {
            if parallel {
                (0..m)
                    .into_par_iter()
                    .with_min_len(16)
                    .for_each(|i| normalize(i, i + 1));
            } else {
                normalize(0, m);
            }
        }
        out
    }
}

/// Packs `b`, `n` rows of `k` values at row stride `ldb` (PyTorch's weight layout `[n, k]`,
/// or keys `[tokens, d]`), into panels of `16·NV` columns, `[k][16·NV]` each (zero-padded),
/// replacing `dst`.
pub(crate) fn pack_nk<const NV: usize>(
    b: &[f32],
    ldb: usize,
    n: usize,
    k: usize,
    dst: &mut Vec<f32>,
) {
    let nr = 16 * NV;
    #[cfg(target_arch = "x86_64")]
    if available() && n > 0 && k > 0 && i32::try_from(15 * ldb).is_ok() {
        // Every value is written, padding included: a buffer of the size is reused as it is.
        dst.resize(n.div_ceil(nr) * k * nr, 0.0);
        // SAFETY: AVX-512F is present; `b` holds n rows of k values at stride ldb, `dst`
        // np·k·nr values.
        return unsafe { imp::pack_nk(b, ldb, n, k, nr, dst) };
    }
    pack_nk_generic(b, ldb, n, k, nr, dst)
}

/// [`pack_nk`] one value at a time, for any CPU.
fn pack_nk_generic(b: &[f32], ldb: usize, n: usize, k: usize, nr: usize, dst: &mut Vec<f32>) {
    let np = n.div_ceil(nr);
    dst.clear();
    dst.resize(np * k * nr, 0.0);
    let fill = |(p, panel): (usize, &mut [f32])| {
        for j in 0..nr.min(n - p * nr) {
            for (kk, &v) in b[(p * nr + j) * ldb..][..k].iter().enumerate() {
                panel[kk * nr + j] = v;
            }
        }
    };
    if np * k * nr >= 1 << 16 {
        dst.par_chunks_mut(k * nr).enumerate().for_each(fill);
    } else {
        dst.chunks_mut(k * nr).enumerate().for_each(fill);
    }
}

/// Packs `b`, `k` rows of `n` values at row stride `ldb` (`[k, n]`: values `[tokens, d]`),
/// into panels of `16·NV` columns, `[k][16·NV]` each (zero-padded), replacing `dst`.
pub(crate) fn pack_kn<const NV: usize>(
    b: &[f32],
    ldb: usize,
    k: usize,
    n: usize,
    dst: &mut Vec<f32>,
) {
    let nr = 16 * NV;
    let np = n.div_ceil(nr);
    dst.clear();
    dst.resize(np * k * nr, 0.0);
    for (p, panel) in dst.chunks_mut(k * nr).enumerate() {
        let cols = nr.min(n - p * nr);
        for (kk, row) in panel.chunks_mut(nr).enumerate() {
            row[..cols].copy_from_slice(&b[kk * ldb + p * nr..][..cols]);
        }
    }
}

/// What a product does to each tile of outputs once they are final, while they are in L1
/// (the same values as a separate pass afterwards, bit for bit).
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    None,
    /// GELU (erf form), as [`super::act::gelu`].
    Gelu,
    /// Adds a residual `[m, n]` of the same shape as the output (`y + r`, as `(y + r)`).
    Add(&'a [f32]),
}

impl Epilogue<'_> {
    /// # Safety
    /// `c` is valid for reads and writes of `rows × cols` at stride `ldc`, and for `Add` the
    /// residual has the same layout.
    unsafe fn apply(
        self,
        c: DstPtr,
        rows: std::ops::Range<usize>,
        ldc: usize,
        cols: std::ops::Range<usize>,
    ) {
        if matches!(self, Epilogue::None) {
            return;
        }
        for i in rows {
            // SAFETY: the caller's contract.
            let y =
                unsafe { std::slice::from_raw_parts_mut(c.at(i * ldc + cols.start), cols.len()) };
            match self {
                Epilogue::None => {}
                Epilogue::Gelu => super::vecmath::gelu_in_place(y),
                Epilogue::Add(r) => {
                    for (y, r) in y.iter_mut().zip(&r[i * ldc + cols.start..][..cols.len()]) {
                        *y += r;
                    }
                }
            }
        }
    }
}

/// `c[i][j] = bias[j] + Σ_k a[i·lda + k] · B[k][j]` on this thread, for the rows `rows` of `a`
/// and the panels `ps` of `panels` (packed as by [`pack_nk`], `n` columns, `k` deep); `c`
/// has row stride `ldc`, `bias` (one value per padded column) is zeros when `None`, and
/// `epilogue` runs on each tile once it is final. Panels go [`COLS_PER_PASS`] columns at a time
/// through `k` in blocks of [`KC`], so that a block of a panel stays in L1 across the row tiles
/// and their outputs in L2. Each output is one FMA chain over `k` from the
/// bias, whatever the ranges: results do not depend on how a product is cut into blocks.
///
/// # Safety
/// AVX-512F present ([`available`]); `a` holds the rows (`lda ≥ k`), `panels` and `bias` the
/// panels; `c` is valid for writes of `rows × (columns of ps)` at stride `ldc`, which no other
/// thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block<const NV: usize>(
    a: &[f32],
    lda: usize,
    rows: std::ops::Range<usize>,
    k: usize,
    panels: &[f32],
    ps: std::ops::Range<usize>,
    n: usize,
    bias: Option<&[f32]>,
    c: DstPtr,
    ldc: usize,
    epilogue: Epilogue,
) {
    const ZERO: [f32; NR] = [0.0; NR];
    let (nr, mr) = (16 * NV, mr(NV));
    let ppp = (COLS_PER_PASS / nr).max(1);
    let (r0, r1) = (rows.start, rows.end);
    if r0 >= r1 || k == 0 {
        return;
    }
    for q0 in ps.clone().step_by(ppp) {
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for p in q0..(q0 + ppp).min(ps.end) {
                let panel = &panels[(p * k + k0) * nr..][..kc * nr];
                let bias = bias.map_or(&ZERO[..nr], |b| &b[p * nr..(p + 1) * nr]);
                let cols = nr.min(n - p * nr);
                for i0 in (r0..r1).step_by(mr) {
                    let mm = mr.min(r1 - i0);
                    // The next tile's outputs, to prefetch: below, or the next panel's top.
                    let next = if i0 + mr < r1 {
                        (i0 + mr) * ldc + p * nr
                    } else {
                        r0 * ldc + (p + 1) * nr
                    };
                    let x = &a[i0 * lda + k0..(i0 + mm - 1) * lda + k0 + kc];
                    // The next tile's rows, to prefetch (any address: prefetches do not fault).
                    let next_rows = a.as_ptr().wrapping_add((i0 + mr) * lda + k0);
                    // And, in the last block of `k`, the residual that its epilogue will add.
                    let next_residual = match epilogue {
                        Epilogue::Add(r) if k0 + kc == k => r.as_ptr().wrapping_add(next),
                        _ => std::ptr::null(),
                    };
                    // SAFETY: the caller's contract; `x` holds mm rows of kc values at stride
                    // lda, `panel` kc·nr values; the first block of `k` writes every output of
                    // the tile before later blocks read it.
                    unsafe {
                        imp::tile::<NV>(
                            x,
                            lda,
                            panel,
                            bias,
                            kc,
                            mm,
                            cols,
                            c.at(i0 * ldc + p * nr),
                            ldc,
                            k0 == 0,
                            c.at(next),
                            next_rows,
                            next_residual,
                        )
                    };
                    if k0 + kc == k {
                        // SAFETY: the tile's outputs, final and still in L1.
                        unsafe { epilogue.apply(c, i0..i0 + mm, ldc, p * nr..p * nr + cols) };
                    }
                }
            }
        }
    }
}

/// Whether a product of `m` rows should take this kernel: at least four row tiles (fewer
/// rows do not repay packing the weights, and leave most of each tile's FMAs idle).
pub fn worth_it(m: usize) -> bool {
    m >= 4 * MR
}

/// Whether full 6 × 64 tiles run their steps of `k` in assembly (`imp::kernel_6x4`).
static ASSEMBLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Runs full 6 × 64 tiles through the assembly loop (the default) or through the intrinsics
/// loop that every other tile takes; both give the same bits. For comparing them.
#[doc(hidden)]
pub fn set_assembly(on: bool) {
    ASSEMBLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the packed path off or on (models then take the general product), to compare them.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether models use it: the CPU runs the kernel and it was not turned off.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed) && available()
}

/// Whether this CPU runs the kernel (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    /// One micro-tile: `c[r][j] = bias[j] + Σ_k a[r·lda + k] · b[k][j]` for `mm` rows and
    /// `cols` columns of a panel `16·NV` wide, `c` with row stride `ldc`, starting from `c`
    /// itself unless `first`; `next` and `next_rows` (any addresses) are prefetched: the
    /// outputs and the rows of the tile that comes next, and `next_residual` unless null (a
    /// matrix laid out as `c`, which its epilogue reads).
    ///
    /// # Safety
    /// AVX-512F present; `a` holds `(mm-1)·lda + k`, `b` `k·16·NV` and `bias` `16·NV` values;
    /// `c` is valid for `mm` rows of `cols` values at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const NV: usize>(
        a: &[f32],
        lda: usize,
        b: &[f32],
        bias: &[f32],
        k: usize,
        mm: usize,
        cols: usize,
        c: *mut f32,
        ldc: usize,
        first: bool,
        next: *const f32,
        next_rows: *const f32,
        next_residual: *const f32,
    ) {
        let t = Tile {
            a,
            lda,
            b,
            bias,
            k,
            cols,
            c,
            ldc,
            first,
            next,
            next_rows,
            next_residual,
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            match (NV, mm) {
                (4, 6) if super::ASSEMBLY.load(std::sync::atomic::Ordering::Relaxed) => {
                    kernel_6x4(t)
                }
                (2, 12) => kernel::<12, NV>(t),
                (2, 11) => kernel::<11, NV>(t),
                (2, 10) => kernel::<10, NV>(t),
                (2, 9) => kernel::<9, NV>(t),
                (2, 8) => kernel::<8, NV>(t),
                (2, 7) => kernel::<7, NV>(t),
                (_, 6) => kernel::<6, NV>(t),
                (_, 5) => kernel::<5, NV>(t),
                (_, 4) => kernel::<4, NV>(t),
                (_, 3) => kernel::<3, NV>(t),
                (_, 2) => kernel::<2, NV>(t),
                _ => kernel::<1, NV>(t),
            }
        }
    }

    /// [`tile`]'s arguments.
    struct Tile<'a> {
        a: &'a [f32],
        lda: usize,
        b: &'a [f32],
        bias: &'a [f32],
        k: usize,
        cols: usize,
        c: *mut f32,
        ldc: usize,
        first: bool,
        next: *const f32,
        next_rows: *const f32,
        next_residual: *const f32,
    }

    /// [`super::pack_nk`] by gathers: each 16 values of a panel row (one `k` of 16 rows of
    /// `b`) in one instruction, instead of 16 scattered stores; the panels' padding is zeroed.
    ///
    /// # Safety
    /// AVX-512F present; `b` holds `n` rows of `k` values at stride `ldb`; `dst` holds
    /// `n.div_ceil(nr)·k·nr` values, `nr` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_nk(b: &[f32], ldb: usize, n: usize, k: usize, nr: usize, dst: &mut [f32]) {
        assert!(
            n > 0 && k > 0 && b.len() >= (n - 1) * ldb + k && dst.len() >= n.div_ceil(nr) * k * nr
        );
        assert!(i32::try_from(15 * ldb).is_ok(), "pack_nk: row stride {ldb}");
        assert_eq!(nr % 16, 0);
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(ldb as i32),
        );
        for j0 in (0..n.div_ceil(nr) * nr).step_by(16) {
            let rows = n.saturating_sub(j0).min(16);
            let m: __mmask16 = if rows == 16 { 0xffff } else { (1 << rows) - 1 };
            let panel = &mut dst[(j0 / nr) * k * nr + j0 % nr..];
            for kk in 0..k {
                // SAFETY: lanes masked to the rows that exist; `kk < k`.
                let v = if rows == 0 {
                    _mm512_setzero_ps()
                } else {
                    unsafe {
                        _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            m,
                            idx,
                            b.as_ptr().add(j0 * ldb + kk),
                        )
                    }
                };
                // SAFETY: 16 values at kk·nr of the panel (asserted length).
                unsafe { _mm512_storeu_ps(panel.as_mut_ptr().add(kk * nr), v) };
            }
        }
    }

    /// The mask of the columns `16·v..16·v+16` that exist, of `cols`.
    fn mask(cols: usize, v: usize) -> __mmask16 {
        let c = cols.saturating_sub(16 * v).min(16);
        if c == 16 {
            0xffff
        } else {
            (1u16 << c) - 1
        }
    }

    /// [`kernel_6x4`]'s assembly for row `$r` at step `$j` of a group: its value broadcast
    /// from `$base`, then multiplied into its four accumulators.
    #[rustfmt::skip]
    macro_rules! row {
        ($x:literal, $r:literal, $base:literal, $j:literal) => {
            concat!(
                "vbroadcastss {", $x, "}, [", $base, " + 4*", $j, "]\n",
                "vfmadd231ps {c", $r, "0}, {w0}, {", $x, "}\n",
                "vfmadd231ps {c", $r, "1}, {w1}, {", $x, "}\n",
                "vfmadd231ps {c", $r, "2}, {w2}, {", $x, "}\n",
                "vfmadd231ps {c", $r, "3}, {w3}, {", $x, "}\n",
            )
        };
    }
    /// Step `$j` of a group of eight: the panel's four vectors, then the six rows.
    #[rustfmt::skip]
    macro_rules! step {
        ($j:literal) => {
            concat!(
                "vmovups {w0}, [{w} + 256*", $j, "]\n",
                "vmovups {w1}, [{w} + 256*", $j, " + 64]\n",
                "vmovups {w2}, [{w} + 256*", $j, " + 128]\n",
                "vmovups {w3}, [{w} + 256*", $j, " + 192]\n",
                row!("x0", "0", "{a0}", $j),
                row!("x1", "1", "{a0} + {l}", $j),
                row!("x0", "2", "{a0} + 2*{l}", $j),
                row!("x1", "3", "{a3}", $j),
                row!("x0", "4", "{a3} + {l}", $j),
                row!("x1", "5", "{a3} + 2*{l}", $j),
            )
        };
    }

    /// [`kernel`] for a full 6 × 64 tile (the linear layers' tile), with its steps of `k`
    /// in assembly, eight at a time: 32 panel loads, 48 broadcasts and 192 FMAs with nothing
    /// else between them (the compiler's loop spent as many instructions again on addresses
    /// and on the prefetches' conditions, which here come once per eight steps). The same
    /// FMAs in the same order as [`kernel`], so the same bits.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_6x4(t: Tile) {
        const M: usize = 6;
        const NV: usize = 4;
        // SAFETY: forwarded from the caller.
        let (mut acc, masks) = unsafe { start::<M, NV>(&t) };
        let (a, lda, b, k, c, ldc) = (t.a, t.lda, t.b, t.k, t.c, t.ldc);
        let (next, next_rows, next_residual) = (t.next, t.next_rows, t.next_residual);
        let nr = 16 * NV;
        // SAFETY: loads within the lengths that `start` asserted (row r at a + r·lda, k values;
        // the panel, k·nr values); prefetches do not fault.
        unsafe {
            let (mut a0, mut a3, mut wp) = (a.as_ptr(), a.as_ptr().add(3 * lda), b.as_ptr());
            for g in 0..k / 8 {
                // The next tile's outputs (24 lines, over the first three groups), then the
                // residual its epilogue adds (the next three), and its rows: the line of each
                // row at this group's steps, so that every line of the block, the first
                // included, is in cache when the next tile starts.
                if g < 3 {
                    for line in 8 * g..8 * g + 8 {
                        prefetch_line::<NV>(next, line, ldc);
                    }
                } else if g < 6 && !next_residual.is_null() {
                    for line in 8 * (g - 3)..8 * (g - 3) + 8 {
                        prefetch_line::<NV>(next_residual, line, ldc);
                    }
                }
                for r in 0..M {
                    let line = next_rows.wrapping_add(r * lda + 8 * g);
                    _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                }
                let [[c00, c01, c02, c03], [c10, c11, c12, c13], [c20, c21, c22, c23], [c30, c31, c32, c33], [c40, c41, c42, c43], [c50, c51, c52, c53]] =
                    &mut acc;
                std::arch::asm!(
                    step!("0"), step!("1"), step!("2"), step!("3"),
                    step!("4"), step!("5"), step!("6"), step!("7"),
                    w = in(reg) wp,
                    a0 = in(reg) a0,
                    a3 = in(reg) a3,
                    l = in(reg) 4 * lda,
                    c00 = inout(zmm_reg) *c00, c01 = inout(zmm_reg) *c01,
                    c02 = inout(zmm_reg) *c02, c03 = inout(zmm_reg) *c03,
                    c10 = inout(zmm_reg) *c10, c11 = inout(zmm_reg) *c11,
                    c12 = inout(zmm_reg) *c12, c13 = inout(zmm_reg) *c13,
                    c20 = inout(zmm_reg) *c20, c21 = inout(zmm_reg) *c21,
                    c22 = inout(zmm_reg) *c22, c23 = inout(zmm_reg) *c23,
                    c30 = inout(zmm_reg) *c30, c31 = inout(zmm_reg) *c31,
                    c32 = inout(zmm_reg) *c32, c33 = inout(zmm_reg) *c33,
                    c40 = inout(zmm_reg) *c40, c41 = inout(zmm_reg) *c41,
                    c42 = inout(zmm_reg) *c42, c43 = inout(zmm_reg) *c43,
                    c50 = inout(zmm_reg) *c50, c51 = inout(zmm_reg) *c51,
                    c52 = inout(zmm_reg) *c52, c53 = inout(zmm_reg) *c53,
                    w0 = out(zmm_reg) _, w1 = out(zmm_reg) _,
                    w2 = out(zmm_reg) _, w3 = out(zmm_reg) _,
                    x0 = out(zmm_reg) _, x1 = out(zmm_reg) _,
                    options(nostack, readonly, preserves_flags),
                );
                a0 = a0.add(8);
                a3 = a3.add(8);
                wp = wp.add(8 * nr);
            }
            steps(&mut acc, a, lda, b, (k / 8) * 8..k);
            finish(&acc, &masks, c, ldc);
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const M: usize, const NV: usize>(t: Tile) {
        // SAFETY: forwarded from the caller.
        let (mut acc, masks) = unsafe { start::<M, NV>(&t) };
        let (a, lda, b, k, c, ldc) = (t.a, t.lda, t.b, t.k, t.c, t.ldc);
        let (next, next_rows, next_residual) = (t.next, t.next_rows, t.next_residual);
        let nr = 16 * NV;
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        // SAFETY: loads within the lengths that `start` asserted; prefetches do not fault.
        unsafe {
            for kk in 0..k {
                // The next tile's outputs, a line a step: in L1 by the time it starts.
                if kk < M * NV {
                    prefetch_line::<NV>(next, kk, ldc);
                }
                // Then the residual its epilogue adds, likewise.
                if !next_residual.is_null() && (M * NV..2 * M * NV).contains(&kk) {
                    prefetch_line::<NV>(next_residual, kk - M * NV, ldc);
                }
                // And its rows, a line of each every 8 steps (a line holds 16).
                if kk % 8 == 0 {
                    for r in 0..M {
                        let line = next_rows.wrapping_add(r * lda + kk + 16);
                        _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                    }
                }
                let w: [__m512; NV] =
                    std::array::from_fn(|v| _mm512_loadu_ps(bp.add(kk * nr + 16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(r * lda + kk));
                    for (acc, w) in acc.iter_mut().zip(&w) {
                        *acc = _mm512_fmadd_ps(x, *w, *acc);
                    }
                }
            }
            finish(&acc, &masks, c, ldc);
        }
    }

    /// Prefetches line `line` of a tile laid out as the outputs (`NV` lines a row, rows
    /// `ldc` apart) from `base`; any address, since prefetches do not fault.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn prefetch_line<const NV: usize>(base: *const f32, line: usize, ldc: usize) {
        let p = base.wrapping_add((line / NV) * ldc + (line % NV) * 16);
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }

    /// A tile's accumulators at the start, from the bias or (unless `first`) from the partial
    /// sums in `c`, and the masks of its columns. Asserts the lengths that the kernels' loads
    /// rely on.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn start<const M: usize, const NV: usize>(
        t: &Tile,
    ) -> ([[__m512; NV]; M], [__mmask16; NV]) {
        let nr = 16 * NV;
        assert!(
            t.k > 0
                && t.a.len() > (M - 1) * t.lda + t.k - 1
                && t.b.len() >= t.k * nr
                && t.bias.len() >= nr
        );
        let masks: [__mmask16; NV] = std::array::from_fn(|v| mask(t.cols, v));
        // SAFETY: `bias` holds nr values (asserted); loads of `c` within the caller's tile,
        // masked to its columns.
        unsafe {
            let init: [__m512; NV] =
                std::array::from_fn(|v| _mm512_loadu_ps(t.bias.as_ptr().add(16 * v)));
            let mut acc = [init; M];
            if !t.first {
                for (r, acc) in acc.iter_mut().enumerate() {
                    for (v, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_maskz_loadu_ps(masks[v], t.c.add(r * t.ldc + 16 * v));
                    }
                }
            }
            (acc, masks)
        }
    }

    /// The steps `ks` of `k`, with no prefetches.
    ///
    /// # Safety
    /// Row r of `a` (at `r·lda`) and the panel `b` (`16·NV` values per step) hold the steps.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn steps<const M: usize, const NV: usize>(
        acc: &mut [[__m512; NV]; M],
        a: &[f32],
        lda: usize,
        b: &[f32],
        ks: std::ops::Range<usize>,
    ) {
        for kk in ks {
            // SAFETY: the caller's contract.
            unsafe {
                let w: [__m512; NV] =
                    std::array::from_fn(|v| _mm512_loadu_ps(b.as_ptr().add(kk * 16 * NV + 16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.as_ptr().add(r * lda + kk));
                    for (acc, w) in acc.iter_mut().zip(&w) {
                        *acc = _mm512_fmadd_ps(x, *w, *acc);
                    }
                }
            }
        }
    }

    /// Stores the accumulators into the tile's columns.
    ///
    /// # Safety
    /// `c` is valid for `M` rows of the masked columns at stride `ldc`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish<const M: usize, const NV: usize>(
        acc: &[[__m512; NV]; M],
        masks: &[__mmask16; NV],
        c: *mut f32,
        ldc: usize,
    ) {
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: the caller's contract.
                unsafe { _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *acc) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const NV: usize>(
        _: &[f32],
        _: usize,
        _: &[f32],
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: *mut f32,
        _: usize,
        _: bool,
        _: *const f32,
        _: *const f32,
        _: *const f32,
    ) {
        unreachable!("PackedLinear::new returns None without AVX-512F")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn reference(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b[j] as f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matches_a_f64_reference_on_odd_shapes_for_any_thread_count() {
        if !available() {
            return;
        }
        let mut r = crate::rng::Rng::new(9);
        for (m, n, k) in [
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 64),
            (97, 70, 129),
            (300, 65, 40),
            (5, 384, 384),
            (128, 100, 300),
            (250, 64, 1536),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
            let p = PackedLinear::new(&w, n, k, Some(&b)).unwrap();
            let want = reference(&x, &w, &b, m, n, k);
            let run = |t: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
                    .install(|| p.forward(&x, m))
            };
            let got = run(1);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "m={m} n={n} k={k}: {g} vs {w}"
                );
            }
            assert_eq!(
                run(2),
                got,
                "m={m} n={n} k={k}: thread count changed the result"
            );
            assert_eq!(run(3), got);
        }
    }

    #[test]
    fn epilogues_give_the_separate_ops_values_bit_for_bit() {
        if !available() {
            return;
        }
        let mut r = crate::rng::Rng::new(4);
        let (m, n, k) = (61, 70, 300);
        let mut normal = |len: usize| -> Vec<f32> { (0..len).map(|_| r.normal() as f32).collect() };
        let (x, w, b, res) = (normal(m * k), normal(n * k), normal(n), normal(m * n));
        let p = PackedLinear::new(&w, n, k, Some(&b)).unwrap();
        let y = p.forward(&x, m);
        let mut g = vec![0f32; m * n];
        crate::model::vecmath::gelu(&y, &mut g);
        assert_eq!(p.forward_with(&x, m, Epilogue::Gelu), g);
        let sum: Vec<f32> = y.iter().zip(&res).map(|(y, r)| y + r).collect();
        assert_eq!(p.forward_with(&x, m, Epilogue::Add(&res)), sum);
    }

    #[test]
    fn a_fused_layer_norm_gives_the_ops_values_bit_for_bit() {
        if !available() {
            return;
        }
        let mut r = crate::rng::Rng::new(8);
        // 61 rows: tasks split the columns, the norm runs after; 1,000: tasks own whole rows.
        for (m, n, k) in [(61, 70, 300), (1000, 50, 40)] {
            let mut normal =
                |len: usize| -> Vec<f32> { (0..len).map(|_| r.normal() as f32).collect() };
            let (x, w, b, res) = (normal(m * k), normal(n * k), normal(n), normal(m * n));
            let (lw, lb) = (normal(n), normal(n));
            let p = PackedLinear::new(&w, n, k, Some(&b)).unwrap();
            let y = p.forward_with(&x, m, Epilogue::Add(&res));
            let t = |v: &[f32], s: &[usize]| Tensor::from_vec(v.to_vec(), s, &Device::Cpu).unwrap();
            let want: Vec<f32> = crate::model::layer_norm::layer_norm(
                &t(&y, &[m, n]),
                &t(&lw, &[n]),
                &t(&lb, &[n]),
                1e-5,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
            let got = p.forward_rows(&x, m, Epilogue::Add(&res), Some((&lw, &lb, 1e-5)));
            assert_eq!(got, want, "{m}×{n}×{k}");
        }
    }

    #[test]
    fn the_assembly_tiles_give_the_intrinsics_bits() {
        if !available() {
            return;
        }
        let mut r = crate::rng::Rng::new(5);
        // k below 8, not a multiple of 8, and over several blocks of KC; columns that fill
        // the panels and ones that do not; rows that leave partial tiles.
        for (m, n, k) in [(12, 64, 5), (37, 130, 203), (96, 384, 384), (50, 70, 1030)] {
            let mut normal =
                |len: usize| -> Vec<f32> { (0..len).map(|_| r.normal() as f32).collect() };
            let (x, w, b, res) = (normal(m * k), normal(n * k), normal(n), normal(m * n));
            let p = PackedLinear::new(&w, n, k, Some(&b)).unwrap();
            let run = |asm: bool| {
                set_assembly(asm);
                let y = (p.forward(&x, m), p.forward_with(&x, m, Epilogue::Add(&res)));
                set_assembly(true);
                y
            };
            assert!(run(true) == run(false), "{m}x{n}x{k}");
        }
    }

    #[test]
    fn gathered_panels_equal_the_generic_packing() {
        let mut r = crate::rng::Rng::new(5);
        let b: Vec<f32> = (0..128 * 1152).map(|_| r.normal() as f32).collect();
        for (n, k, ldb) in [
            (45, 40, 1152),
            (128, 32, 1152),
            (1, 1, 1),
            (17, 5, 5),
            (64, 384, 384),
        ] {
            let (mut fast, mut slow) = (vec![7.0; 3], Vec::new());
            // Twice: the second call reuses the buffer as it is.
            for _ in 0..2 {
                pack_nk::<2>(&b, ldb, n, k, &mut fast);
                pack_nk_generic(&b, ldb, n, k, 32, &mut slow);
                assert_eq!(fast, slow, "[{n}, {k}] at stride {ldb}, 32 wide");
                pack_nk::<4>(&b, ldb, n, k, &mut fast);
                pack_nk_generic(&b, ldb, n, k, 64, &mut slow);
                assert_eq!(fast, slow, "[{n}, {k}] at stride {ldb}, 64 wide");
            }
        }
    }
}
