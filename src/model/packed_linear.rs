//! A linear layer's forward pass (`y = x·Wᵀ + b`) on weights packed once, for inference.
//!
//! The general f32 product ([`super::kernels::gemm_tiled`], the `gemm` crate) packs both
//! operands on every call: the weights are repacked for each block of rows of every batch, and
//! a separate pass writes the bias. A frozen layer's weights do not change, so this packs them
//! once (kept by [`crate::model::ParamStore::derived`]) into panels of [`NR`] = 32 output
//! channels, `[k][32]`, and runs an AVX-512 micro-kernel of [`MR`] = 12 rows × 32 columns:
//! 24 accumulators that start from the bias, two panel loads and twelve broadcasts of the
//! (packed) rows per `k`, 24 FMAs. Each task packs its block of rows once (`[k][12]` per
//! micro-tile) and runs it against every panel of its group.
//!
//! The output tiles and each value's order of operations (one FMA chain over `k`, from the
//! bias) depend only on the shapes, so the result is the same for any thread count. It differs
//! from the `gemm` crate's in the last bits (another summation order). Only CPUs with AVX-512F
//! use it ([`PackedLinear::new`] returns `None` elsewhere, and callers keep the general path).

use rayon::prelude::*;

use candle_core::{DType, Tensor};

use super::kernels::{with_f32, DstPtr};

/// Rows of the micro-kernel.
pub const MR: usize = 12;
/// Output channels of a panel (two AVX-512 registers).
pub const NR: usize = 32;
/// `k` values per block (a block of a panel, 16 KiB, stays in L1 across the task's tiles).
const KC: usize = 128;
/// Micro-tiles of rows per task (their packed rows are shared by every panel of the task).
const TILES_PER_TASK: usize = 8;

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
        let mut panels = vec![0f32; np * k * NR];
        panels
            .par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR.min(n - p * NR) {
                    for (kk, &v) in w[(p * NR + j) * k..][..k].iter().enumerate() {
                        panel[kk * NR + j] = v;
                    }
                }
            });
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
        let y = match with_f32(&x, |v| self.forward(v, m)) {
            Some(y) => y,
            None => self.forward(&x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?, m),
        };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("k > 0") = self.n;
        Tensor::from_vec(y, shape, x.device())
    }

    /// `x·Wᵀ + b` for the `m` rows of `x` (`[m, k]`): `[m, n]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
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
        let rows_per_task = MR * TILES_PER_TASK;
        let row_blocks = m.div_ceil(rows_per_task);
        // Few rows (a short batch): split the panels too, so that every core works.
        let group = if row_blocks >= 4 {
            panels
        } else {
            panels.div_ceil(4 / row_blocks).max(1)
        };
        let groups = panels.div_ceil(group);
        let dst = DstPtr(out.as_mut_ptr());
        let task = |t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let r0 = rb * rows_per_task;
            let rows = rows_per_task.min(m - r0);
            PACKED_ROWS.with(|buf| {
                let mut a = buf.borrow_mut();
                pack_rows(&x[r0 * k..(r0 + rows) * k], rows, k, &mut a);
                // Blocks of `k` whose panel rows stay in L1 while every row tile of the task
                // runs against them; the tiles' sums go through `out` between blocks.
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    for p in g * group..((g + 1) * group).min(panels) {
                        let panel = &self.panels[(p * k + k0) * NR..][..kc * NR];
                        let bias = &self.bias[p * NR..(p + 1) * NR];
                        let cols = NR.min(n - p * NR);
                        for (ti, i0) in (0..rows).step_by(MR).enumerate() {
                            let mm = MR.min(rows - i0);
                            let at = dst.at((r0 + i0) * n + p * NR);
                            let rows_k = &a[(ti * k + k0) * MR..][..kc * MR];
                            // SAFETY: this tile owns rows r0+i0..+mm, columns p·NR..+cols of
                            // `out` (written by the first block before later ones read it);
                            // the slices hold kc·MR and kc·NR values.
                            unsafe { imp::tile(rows_k, panel, bias, kc, mm, cols, at, n, k0 == 0) };
                        }
                    }
                }
            });
        };
        let tasks = row_blocks * groups;
        if tasks > 1 && rayon::current_num_threads() > 1 && m * n * k >= 1 << 18 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
        out
    }
}

thread_local! {
    /// The current task's rows, packed.
    static PACKED_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs `rows` rows of `x` (`[rows, k]`) into micro-tiles `[k][MR]` (the last one
/// zero-padded).
fn pack_rows(x: &[f32], rows: usize, k: usize, dst: &mut Vec<f32>) {
    let tiles = rows.div_ceil(MR);
    dst.clear();
    dst.resize(tiles * k * MR, 0.0);
    for (t, tile) in dst.chunks_exact_mut(k * MR).enumerate() {
        for r in 0..MR.min(rows - t * MR) {
            let row = &x[(t * MR + r) * k..][..k];
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * MR + r] = v;
            }
        }
    }
}

/// Whether a product of `m` rows should take this kernel: at least four full tasks of rows.
/// With fewer (a single sequence), the general product's column tiles balance two cores
/// better (measured: 128 rows ran 22–28% slower here in MiniLM).
pub fn worth_it(m: usize) -> bool {
    m >= 4 * MR * TILES_PER_TASK
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
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// One micro-tile: `c[r][j] = bias[j] + Σ_k a[k][r] · b[k][j]` for `mm` rows and `cols`
    /// columns, `c` with row stride `ldc`.
    ///
    /// # Safety
    /// AVX-512F present; `a` holds `k·MR`, `b` `k·NR` and `bias` `NR` values; `c` is valid for
    /// `mm` rows of `cols` values at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        a: &[f32],
        b: &[f32],
        bias: &[f32],
        k: usize,
        mm: usize,
        cols: usize,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match mm {
                12 => kernel::<12>(a, b, bias, k, cols, c, ldc, first),
                11 => kernel::<11>(a, b, bias, k, cols, c, ldc, first),
                10 => kernel::<10>(a, b, bias, k, cols, c, ldc, first),
                9 => kernel::<9>(a, b, bias, k, cols, c, ldc, first),
                8 => kernel::<8>(a, b, bias, k, cols, c, ldc, first),
                7 => kernel::<7>(a, b, bias, k, cols, c, ldc, first),
                6 => kernel::<6>(a, b, bias, k, cols, c, ldc, first),
                5 => kernel::<5>(a, b, bias, k, cols, c, ldc, first),
                4 => kernel::<4>(a, b, bias, k, cols, c, ldc, first),
                3 => kernel::<3>(a, b, bias, k, cols, c, ldc, first),
                2 => kernel::<2>(a, b, bias, k, cols, c, ldc, first),
                _ => kernel::<1>(a, b, bias, k, cols, c, ldc, first),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const M: usize>(
        a: &[f32],
        b: &[f32],
        bias: &[f32],
        k: usize,
        cols: usize,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        assert!(a.len() >= k * MR && b.len() >= k * NR && bias.len() >= NR);
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols) - 1
        };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        // SAFETY: loads within the lengths asserted above; loads and stores of `c` within the
        // caller's tile.
        unsafe {
            let b0 = _mm512_loadu_ps(bias.as_ptr());
            let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
            let mut acc = [[b0, b1]; M];
            if !first {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let src = c.add(r * ldc);
                    acc[0] = _mm512_maskz_loadu_ps(m0, src);
                    acc[1] = _mm512_maskz_loadu_ps(m1, src.add(16));
                }
            }
            for kk in 0..k {
                let w0 = _mm512_loadu_ps(bp.add(kk * NR));
                let w1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
                let row = ap.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*row.add(r));
                    acc[0] = _mm512_fmadd_ps(x, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, w1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let dst = c.add(r * ldc);
                _mm512_mask_storeu_ps(dst, m0, acc[0]);
                _mm512_mask_storeu_ps(dst.add(16), m1, acc[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("PackedLinear::new returns None without AVX-512F")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
