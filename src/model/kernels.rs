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
}

/// Applies `f` to the f32 data of `t` in place (no allocation). CPU tensors only.
pub fn update_in_place(t: &Tensor, f: impl FnMut(&mut [f32])) -> Result<()> {
    t.inplace_op1(&InPlace(RefCell::new(f)))
        .map_err(Error::from)
}

/// Work below this many multiply-adds runs on one thread: waking a second rayon worker costs
/// tens of microseconds, more than splitting a smaller product saves (measured on the digits MLP,
/// whose largest product is 64×256×256 = 4M).
const PARALLEL_MIN_FLOPS: usize = 1 << 23;
/// Fewest output rows per thread when splitting.
const PARALLEL_MIN_ROWS: usize = 8;

/// `dst[m×n]` (row-major, contiguous) `=` or `+=` `A·B`, where `A` is `m×k` and `B` is `k×n`,
/// each given by a slice and its (row, column) strides, so transposes cost nothing.
///
/// The result does not depend on the number of threads: the rows of the output are split
/// between threads, and every output element is reduced over `k` in the same order whatever
/// the split.
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
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= PARALLEL_MIN_FLOPS && m >= 2 * PARALLEL_MIN_ROWS {
        use rayon::prelude::*;
        let rows = m.div_ceil(threads).max(PARALLEL_MIN_ROWS);
        dst[..m * n]
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(i, d)| {
                let r0 = i * rows;
                let mi = d.len() / n;
                gemm_serial(
                    mi,
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
            });
    } else {
        gemm_serial(m, n, k, dst, accumulate, a, a_rs, a_cs, b, b_rs, b_cs);
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
