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
        let p = self.spec;
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
                                for j in 0..c {
                                    let v = x[at + j];
                                    // `!(v <= o)` also takes a NaN, as PyTorch propagates it.
                                    if v > o[j] || (v.is_nan() && !o[j].is_nan()) {
                                        o[j] = v;
                                        a[j] = (at + j) as u32;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = arg;
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, c))))
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
        let per_in = h * w * c;
        let per_out = dy.len() / n.max(1);
        let mut dx = vec![0f32; x.elem_count()];
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
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Max pooling of NHWC `x`.
pub fn max_pool2d(x: &Tensor, spec: PoolSpec) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        if spec.padding != 0 {
            candle_core::bail!("max pool with padding runs on the CPU only");
        }
        let y = x
            .permute((0, 3, 1, 2))?
            .max_pool2d_with_stride(spec.kernel, spec.stride)?;
        return y.permute((0, 2, 3, 1))?.contiguous();
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
