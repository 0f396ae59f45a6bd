//! Small CPU kernels that let wick work on candle tensors without per-op allocation:
//! borrowing a tensor's f32 storage, updating a variable in place, and a row-major GEMM.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use crate::{Error, Result};

/// The contiguous f32 CPU data behind `storage` + `layout`, if it is that.
pub fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

/// The f32 values behind a custom op's input, which must be contiguous f32 CPU data; the error
/// names the op and the input (`what`).
pub fn op_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be a contiguous f32 CPU tensor"),
    }
}

/// Runs `f` on the contiguous f32 CPU data of `t`; `None` if `t` is not such a tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (s, l) = t.storage_and_layout();
    cpu_f32(&s, l).map(f)
}

struct InPlace<F>(RefCell<F>);

impl<F: FnMut(&mut [f32])> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "wick-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                (self.0.borrow_mut())(&mut v[a..b]);
                Ok(())
            }
            _ => candle_core::bail!("wick-update: expected a contiguous f32 tensor"),
        }
    }

    /// On a GPU the values make a round trip through host memory: correct, not fast (the
    /// optimizer's update then costs two copies of the parameters per step).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &mut candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("wick-update: expected a contiguous f32 tensor")
        };
        let stream = storage.device.cuda_stream();
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let mut view = slice.slice_mut(a..b);
        let mut host = vec![0f32; b - a];
        stream
            .memcpy_dtoh(&view, &mut host)
            .map_err(|e| candle_core::Error::Msg(format!("wick-update: {e:?}")))?;
        (self.0.borrow_mut())(&mut host);
        stream
            .memcpy_htod(&host, &mut view)
            .map_err(|e| candle_core::Error::Msg(format!("wick-update: {e:?}")))?;
        Ok(())
    }
}

/// Applies `f` to the f32 data of `t` in place (no allocation on the CPU; through a host copy
/// on a GPU).
pub fn update_in_place(t: &Tensor, f: impl FnMut(&mut [f32])) -> Result<()> {
    t.inplace_op1(&InPlace(RefCell::new(f)))
        .map_err(Error::from)
}

/// `dst += src`, element-wise, in parallel chunks (gradients added into their buffers).
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "add_into: lengths differ");
    dst.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
}

/// Work below this many multiply-adds runs on one thread: waking a second rayon worker costs
/// tens of microseconds, more than splitting a smaller product saves (measured on the digits MLP,
/// whose largest product is 64×256×256 = 4M).
const PARALLEL_MIN_FLOPS: usize = 1 << 23;
/// Output rows per block. Products with more rows are always computed block by block, on one
/// thread or many, so the arithmetic (which the `gemm` crate chooses from each block's shape) is
/// the same whatever the thread count.
const ROW_BLOCK: usize = 256;
/// Output columns per tile in [`gemm_tiled`] when the product has few rows.
const COL_BLOCK: usize = 128;

/// `dst[m×n]` (row-major, contiguous) `=` or `+=` `A·B`, where `A` is `m×k` and `B` is `k×n`,
/// each given by a slice and its (row, column) strides, so transposes cost nothing.
///
/// The result does not depend on the number of threads: the output is cut into blocks of
/// `ROW_BLOCK` rows whatever the thread count, and threads only decide who computes which
/// block.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    assert!(dst.len() >= m * n, "gemm: dst too small");
    if m == 0 || n == 0 {
        return;
    }
    if m <= ROW_BLOCK {
        return gemm_serial(m, n, k, dst, accumulate, a, a_rs, a_cs, b, b_rs, b_cs);
    }
    let block = |(i, d): (usize, &mut [f32])| {
        let r0 = i * ROW_BLOCK;
        gemm_serial(
            d.len() / n,
            n,
            k,
            d,
            accumulate,
            &a[r0 * a_rs..],
            a_rs,
            a_cs,
            b,
            b_rs,
            b_cs,
        );
    };
    let dst = &mut dst[..m * n];
    if rayon::current_num_threads() > 1 && m * n * k >= PARALLEL_MIN_FLOPS {
        use rayon::prelude::*;
        dst.par_chunks_mut(ROW_BLOCK * n)
            .enumerate()
            .for_each(block);
    } else {
        dst.chunks_mut(ROW_BLOCK * n).enumerate().for_each(block);
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    if k > 0 {
        let a_last = (m - 1) * a_rs + (k - 1) * a_cs;
        let b_last = (k - 1) * b_rs + (n - 1) * b_cs;
        assert!(
            a_last < a.len() && b_last < b.len(),
            "gemm: operand too small"
        );
    }
    // SAFETY: the bounds of every operand were checked above for the given strides, and
    // `dst` is a unique borrow of at least m×n elements with row stride n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Columns per tile of a product with few rows: at most [`COL_BLOCK`], and for wide products
/// a width that cuts them into a multiple of 4 tiles (a layer of 384 outputs into 4 × 96
/// rather than 3 × 128), so that 2 or 4 threads get equal shares. It depends only on `n`.
fn column_tile(n: usize) -> usize {
    if n < 2 * COL_BLOCK {
        return COL_BLOCK.min(n);
    }
    let tiles = 4 * n.div_ceil(4 * COL_BLOCK);
    n.div_ceil(tiles).next_multiple_of(16)
}

/// A raw output pointer that tiles of one product share; each tile writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct DstPtr(pub(crate) *mut f32);
// SAFETY: its users (`gemm_tiled`, the direct convolution) hand every thread a disjoint set of
// output tiles.
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer `off` elements further (a method, so closures capture the whole `DstPtr`).
    pub(crate) fn at(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

/// `dst[i*dst_rs + j]` (`m×n`, row stride `dst_rs ≥ n`) `=` or `+=` `A·B`, with `A` (`m×k`) and
/// `B` (`k×n`) given by slices and (row, column) strides.
///
/// The output is cut into tiles whose shape depends only on `(m, n)`: blocks of `ROW_BLOCK`
/// rows when there are many rows, else column blocks of `COL_BLOCK`. Threads only decide who
/// computes which tile, so the result is the same for any thread count. Convolutions use it:
/// their products are either tall (`P×Cout`) or wide (`Cout×K`), and both kinds split evenly.
#[allow(clippy::too_many_arguments)]
pub fn gemm_tiled(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n,
        "gemm: dst too small"
    );
    if k > 0 {
        let a_last = (m - 1) * a_rs + (k - 1) * a_cs;
        let b_last = (k - 1) * b_rs + (n - 1) * b_cs;
        assert!(
            a_last < a.len() && b_last < b.len(),
            "gemm: operand too small"
        );
    }
    let (tm, tn) = if m >= 2 * ROW_BLOCK {
        (ROW_BLOCK, n)
    } else {
        (m, column_tile(n))
    };
    let (rt, ct) = (m.div_ceil(tm), n.div_ceil(tn));
    let ptr = DstPtr(dst.as_mut_ptr());
    let tile = |t: usize| {
        let (i0, j0) = ((t / ct) * tm, (t % ct) * tn);
        let (mm, nn) = (tm.min(m - i0), tn.min(n - j0));
        // SAFETY: operand bounds were checked above for the full product; this tile reads
        // a sub-block of them and writes rows i0..i0+mm, columns j0..j0+nn of dst, which no
        // other tile touches.
        unsafe {
            gemm::gemm(
                mm,
                nn,
                k,
                ptr.at(i0 * dst_rs + j0),
                1,
                dst_rs as isize,
                accumulate,
                a.as_ptr().add(i0 * a_rs),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr().add(j0 * b_cs),
                b_cs as isize,
                b_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if rayon::current_num_threads() > 1 && rt * ct > 1 && m * n * k >= PARALLEL_MIN_FLOPS / 4 {
        use rayon::prelude::*;
        (0..rt * ct).into_par_iter().for_each(tile);
    } else {
        (0..rt * ct).for_each(tile);
    }
}

/// Largest absolute element-wise difference of two tensors (for the unit tests of the ops).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar())
        .expect("tensors of one shape")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_with_transposes() {
        let mut r = Rng::new(1);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (64, 256, 64), (17, 33, 129)] {
            let a: Vec<f32> = (0..m * k).map(|_| r.next_f32() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| r.next_f32() - 0.5).collect();
            let want = naive(m, n, k, &a, &b);
            let mut c = vec![0f32; m * n];
            gemm(m, n, k, &mut c, false, &a, k, 1, &b, n, 1);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
            // B given transposed: bt is n×k, B(p, j) = bt[j*k + p].
            let mut bt = vec![0f32; n * k];
            for p in 0..k {
                for j in 0..n {
                    bt[j * k + p] = b[p * n + j];
                }
            }
            let mut c2 = vec![1f32; m * n];
            gemm(m, n, k, &mut c2, true, &a, k, 1, &bt, 1, k);
            for (x, y) in c2.iter().zip(&want) {
                assert!((x - 1.0 - y).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn gemm_is_identical_for_any_thread_count() {
        let mut r = Rng::new(2);
        for &(m, n, k) in &[
            (128, 64, 1100),
            (200, 600, 600),
            (65, 300, 700),
            (1000, 70, 130),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| r.next_f32() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| r.next_f32() - 0.5).collect();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut c = vec![0f32; m * n];
                    gemm(m, n, k, &mut c, false, &a, k, 1, &b, n, 1);
                    c
                })
            };
            let one = run(1);
            assert_eq!(one, run(2), "{m}x{n}x{k}");
            assert_eq!(one, run(4), "{m}x{n}x{k}");
        }
    }

    #[test]
    fn update_in_place_writes_the_variable() {
        let v = candle_core::Var::new(&[1f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
        update_in_place(v.as_tensor(), |x| x.iter_mut().for_each(|e| *e *= 2.0)).unwrap();
        assert_eq!(v.to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0]);
        assert_eq!(
            with_f32(v.as_tensor(), |s| s.to_vec()).unwrap(),
            [2.0, 4.0, 6.0]
        );
    }
}
