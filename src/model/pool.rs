//! Max pooling over NHWC activations as a candle custom op with a backward pass (candle's CPU
//! max-pool backward fails). Padding counts as −∞, as in PyTorch; gradients go to the first
//! maximum of each window.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Kernel size, stride and padding of a square max pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl PoolSpec {
    fn out(&self, i: usize) -> candle_core::Result<usize> {
        match (i + 2 * self.padding).checked_sub(self.kernel) {
            Some(v) if self.stride > 0 && self.padding * 2 <= self.kernel => {
                Ok(v / self.stride + 1)
            }
            _ => candle_core::bail!("max pool: input of {i} is too small for {self:?}"),
        }
    }
}

struct MaxPool {
    spec: PoolSpec,
    /// For each output element, the flat input index of its maximum.
    argmax: Arc<Mutex<Vec<u32>>>,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "wick-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::kernels::op_f32(s, l, "max pool", "the input")?;
        let &[n, h, w, c] = l.dims() else {
            candle_core::bail!("max pool: expected [n, h, w, c], got {:?}", l.dims())
        };
        let (out, arg, dims) = max_pool_forward(x, [n, h, w, c], self.spec)?;
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = arg;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let arg = self
            .argmax
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let dy: Vec<f32> = dy.flatten_all()?.to_vec1()?;
        let &[n, h, w, c] = x.dims() else {
            candle_core::bail!("max pool: bad input shape")
        };
        let dx = max_pool_backward(&arg, &dy, n, h * w * c);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Max pooling of NHWC `x` (`dims`): the output, the flat input index of each output's
/// maximum, and the output dims.
pub(crate) fn max_pool_forward(
    x: &[f32],
    [n, h, w, c]: [usize; 4],
    p: PoolSpec,
) -> candle_core::Result<(Vec<f32>, Vec<u32>, [usize; 4])> {
    let (ho, wo) = (p.out(h)?, p.out(w)?);
    let mut out = vec![0f32; n * ho * wo * c];
    let mut arg = vec![0u32; out.len()];
    out.par_chunks_mut(ho * wo * c)
        .zip(arg.par_chunks_mut(ho * wo * c))
        .enumerate()
        .for_each(|(b, (o, a))| {
            let base = b * h * w * c;
            for oh in 0..ho {
                for ow in 0..wo {
                    let o = &mut o[(oh * wo + ow) * c..][..c];
                    let a = &mut a[(oh * wo + ow) * c..][..c];
                    o.fill(f32::NEG_INFINITY);
                    for ki in 0..p.kernel {
                        let ih = (oh * p.stride + ki) as isize - p.padding as isize;
                        if ih < 0 || ih as usize >= h {
                            continue;
                        }
                        for kj in 0..p.kernel {
                            let iw = (ow * p.stride + kj) as isize - p.padding as isize;
                            if iw < 0 || iw as usize >= w {
                                continue;
                            }
                            let at = base + (ih as usize * w + iw as usize) * c;
                            let xs = &x[at..at + c];
                            // Branch-free selects, so that the loop vectorizes. A NaN is
                            // taken over a number, as PyTorch propagates it.
                            for (j, ((o, a), &v)) in
                                o.iter_mut().zip(a.iter_mut()).zip(xs).enumerate()
                            {
                                let take = (v > *o) | (v.is_nan() & !o.is_nan());
                                *o = if take { v } else { *o };
                                *a = if take { (at + j) as u32 } else { *a };
                            }
                        }
                    }
                }
            }
        });
    Ok((out, arg, [n, ho, wo, c]))
}

/// The input gradient of a max pool over `n` images of `per_in` values: each output's gradient
/// goes to its maximum (`arg`, from [`max_pool_forward`]).
pub(crate) fn max_pool_backward(arg: &[u32], dy: &[f32], n: usize, per_in: usize) -> Vec<f32> {
    let per_out = dy.len() / n.max(1);
    let mut dx = vec![0f32; n * per_in];
    // Each image's outputs only reach that image's inputs: one task per image.
    dx.par_chunks_mut(per_in).enumerate().for_each(|(b, d)| {
        let (a, g) = (
            &arg[b * per_out..][..per_out],
            &dy[b * per_out..][..per_out],
        );
        for (&i, &g) in a.iter().zip(g) {
            d[i as usize - b * per_in] += g;
        }
    });
    dx
}

/// `x` with `before` and `after` slices of the lowest f32 added along `dim`.
fn pad_low(x: &Tensor, dim: usize, before: usize, after: usize) -> candle_core::Result<Tensor> {
    if before + after == 0 {
        return Ok(x.clone());
    }
    let low = |len: usize| {
        let mut dims = x.dims().to_vec();
        dims[dim] = len;
        Tensor::full(f32::MIN, dims, x.device())
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(low(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(low(after)?);
    }
    Tensor::cat(&parts, dim)
}

/// [`max_pool2d`] from candle's own differentiable ops, for devices without wick's kernel (a
/// GPU; candle's pooling has no backward pass for overlapping windows): the maximum, taken
/// element-wise, of the kernel's `k²` strided views of the input padded with the lowest f32.
fn max_pool2d_composite(x: &Tensor, spec: PoolSpec) -> candle_core::Result<Tensor> {
    use candle_core::IndexOp;
    let (n, h, w, c) = x.dims4()?;
    let (oh, ow) = (spec.out(h)?, spec.out(w)?);
    let (k, s, p) = (spec.kernel, spec.stride.max(1), spec.padding);
    // Rows (columns) needed: every window start s·t + (0..k), and whole groups of s after each
    // start so that a strided view is a reshape.
    let (need_h, need_w) = (k - 1 + s * oh, k - 1 + s * ow);
    let xp = pad_low(x, 1, p, need_h.saturating_sub(h + p))?;
    let xp = pad_low(&xp, 2, p, need_w.saturating_sub(w + p))?;
    let mut y: Option<Tensor> = None;
    for di in 0..k {
        for dj in 0..k {
            let v = xp
                .narrow(1, di, s * oh)?
                .narrow(2, dj, s * ow)?
                .reshape((n, oh, s, ow, s, c))?
                .i((.., .., 0, .., 0, ..))?;
            y = Some(match y {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    y.ok_or_else(|| candle_core::Error::Msg("max pool: kernel size 0".into()))?
        .contiguous()
}

/// Max pooling of NHWC `x`.
pub fn max_pool2d(x: &Tensor, spec: PoolSpec) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return max_pool2d_composite(x, spec);
    }
    let op = MaxPool {
        spec,
        argmax: Arc::new(Mutex::new(Vec::new())),
    };
    x.contiguous()?.apply_op1(op)
}

/// Global average pooling: NHWC `[n, h, w, c]` → `[n, c]`.
pub fn global_avg_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    x.reshape((n, h * w, c))?.mean(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The GPU fallback pools like the kernel, forward and backward (the ResNet stem's
    /// overlapping 3×3, stride 2, padding 1 windows, and others).
    #[test]
    fn the_composite_fallback_matches_the_kernel() {
        let mut rng = crate::rng::Rng::keyed(3, "pool-test", 0);
        for (h, w, k, s, p) in [(9, 8, 3, 2, 1), (8, 8, 2, 2, 0), (7, 5, 3, 1, 1)] {
            let (n, c) = (2, 3);
            let vals: Vec<f32> = (0..n * h * w * c).map(|_| rng.next_f32() - 0.5).collect();
            let x = Var::from_tensor(&Tensor::from_vec(vals, (n, h, w, c), &Device::Cpu).unwrap())
                .unwrap();
            let spec = PoolSpec {
                kernel: k,
                stride: s,
                padding: p,
            };
            let a = max_pool2d(x.as_tensor(), spec).unwrap();
            let b = max_pool2d_composite(x.as_tensor(), spec).unwrap();
            assert_eq!(a.dims(), b.dims());
            let d = crate::model::kernels::max_abs_diff;
            assert_eq!(d(&a, &b), 0.0, "{h}x{w} k{k} s{s} p{p}");
            let r = Tensor::from_vec(
                (0..a.elem_count())
                    .map(|_| rng.next_f32())
                    .collect::<Vec<_>>(),
                a.shape(),
                &Device::Cpu,
            )
            .unwrap();
            let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap(),
            );
            assert!(d(ga, gb) < 1e-6, "gradients differ by {}", d(ga, gb));
        }
    }
}
