//! Multi-head self-attention as one fused candle custom op: from the packed query/key/value
//! projections `[n, L, 3·H]` and the attention mask `[n, L]` straight to the context
//! `[n, L, H]`, one (sequence, head) pair per task. The `[n, heads, L, L]` scores never
//! become candle tensors (no transposes, no copies); the backward pass recomputes them per
//! pair, as flash attention does. Attention-probability dropout draws its mask from a hash of
//! (seed, position), so the backward pass regenerates the same mask and runs stay
//! reproducible.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{gemm_tiled, op_f32};

/// Settings of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    pub heads: usize,
    /// Dropout on the attention probabilities, and the seed of its mask.
    pub dropout: f32,
    pub seed: u64,
}

/// Scaled dot-product self-attention over packed `qkv` (`[n, L, 3·H]`: queries, keys, values)
/// with `mask` (`[n, L]`, 1 = token, 0 = padding, f32). Returns `[n, L, H]`.
pub fn attention(qkv: &Tensor, mask: &Tensor, spec: AttentionSpec) -> candle_core::Result<Tensor> {
    if !qkv.device().is_cpu() {
        return attention_composite(qkv, mask, spec);
    }
    let op = Attention(spec);
    qkv.contiguous()?.apply_op2(&mask.contiguous()?, op)
}

/// [`attention`] from candle's own ops, for devices without wick's kernel (a GPU): the same
/// function, dropout mask included (drawn on the host from the same hash), at candle's speed.
fn attention_composite(
    qkv: &Tensor,
    mask: &Tensor,
    spec: AttentionSpec,
) -> candle_core::Result<Tensor> {
    use candle_core::D;
    let (n, len, h3) = qkv.dims3()?;
    let (h, heads) = (h3 / 3, spec.heads);
    if h3 % 3 != 0 || heads == 0 || h % heads != 0 {
        candle_core::bail!("attention: packed width {h3} is not 3 × a multiple of {heads} heads");
    }
    let d = h / heads;
    // [3, n, heads, L, d]
    let parts = qkv
        .reshape((n, len, 3, heads, d))?
        .permute((2, 0, 3, 1, 4))?;
    let (q, k, v) = (
        parts.get(0)?.contiguous()?,
        parts.get(1)?.contiguous()?,
        parts.get(2)?.contiguous()?,
    );
    let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    // 0 for tokens, a large negative number for padding (finite, so an all-padding row stays
    // a uniform distribution instead of NaN).
    let bias = ((mask.to_dtype(scores.dtype())? - 1.0)? * 1e9)?.reshape((n, 1, 1, len))?;
    let scores = scores.broadcast_add(&bias)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let mut p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    if spec.dropout > 0.0 {
        let scale = 1.0 / (1.0 - spec.dropout);
        let mut m = Vec::with_capacity(n * heads * len * len);
        for pair in 0..n * heads {
            for i in 0..len {
                for j in 0..len {
                    m.push(if keep(spec.seed, pair, i, j, len, spec.dropout) {
                        scale
                    } else {
                        0.0
                    });
                }
            }
        }
        let m = Tensor::from_vec(m, (n, heads, len, len), qkv.device())?;
        p = (p * m)?;
    }
    p.matmul(&v)?.permute((0, 2, 1, 3))?.reshape((n, len, h))
}

struct Attention(AttentionSpec);

/// `(n, L, H, d)` of an attention call, checked.
fn dims(
    spec: &AttentionSpec,
    l: &Layout,
    lm: &Layout,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (n, len, h3) = l.shape().dims3()?;
    let h = h3 / 3;
    if h3 % 3 != 0 || spec.heads == 0 || h % spec.heads != 0 {
        candle_core::bail!(
            "attention: packed width {h3} is not 3 × a multiple of {} heads",
            spec.heads
        );
    }
    if lm.dims() != [n, len] {
        candle_core::bail!(
            "attention: mask {:?} does not match the sequences [{n}, {len}]",
            lm.dims()
        );
    }
    Ok((n, len, h, h / spec.heads))
}

/// Whether attention probability (pair, i, j) is kept by dropout.
#[inline]
fn keep(seed: u64, pair: usize, i: usize, j: usize, len: usize, p: f32) -> bool {
    let mut z = seed ^ ((pair * len + i) * len + j) as u64;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 40) as f32) / ((1u64 << 24) as f32) >= p
}

/// One (sequence, head) pair's probabilities `P` (softmax of the masked, scaled scores).
struct Pair {
    b: usize,
    head: usize,
    len: usize,
    h: usize,
    d: usize,
}

impl Pair {
    fn new(index: usize, heads: usize, len: usize, h: usize, d: usize) -> Self {
        Self {
            b: index / heads,
            head: index % heads,
            len,
            h,
            d,
        }
    }

    /// Offset of this pair's query (`part` 0), key (1) or value (2) block in `qkv`.
    fn at(&self, part: usize) -> usize {
        self.b * self.len * 3 * self.h + part * self.h + self.head * self.d
    }

    /// Softmax of the scaled scores with padding masked out, into `p` (`L×L`).
    fn probs(&self, qkv: &[f32], mask: &[f32], p: &mut [f32]) {
        let (len, d, rs) = (self.len, self.d, 3 * self.h);
        gemm_tiled(
            len,
            len,
            d,
            p,
            len,
            false,
            &qkv[self.at(0)..],
            rs,
            1,
            &qkv[self.at(1)..],
            1,
            rs,
        );
        let scale = 1.0 / (d as f32).sqrt();
        let keep = &mask[self.b * len..(self.b + 1) * len];
        for row in p.chunks_exact_mut(len) {
            super::vecmath::softmax_masked(row, keep, scale);
        }
    }

    /// Multiplies `p` by the dropout mask (kept values scaled by `1 / (1 − p)`).
    fn drop(&self, spec: &AttentionSpec, p: &mut [f32]) {
        if spec.dropout <= 0.0 {
            return;
        }
        let pair = self.b * spec.heads + self.head;
        let scale = 1.0 / (1.0 - spec.dropout);
        for (i, row) in p.chunks_exact_mut(self.len).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = if keep(spec.seed, pair, i, j, self.len, spec.dropout) {
                    *v * scale
                } else {
                    0.0
                };
            }
        }
    }
}

/// Writes per-pair `L×d` blocks into `[n, L, width]` at column `col(pair)`.
fn scatter<'a>(
    out: &mut [f32],
    block: impl Fn(usize) -> &'a [f32] + Sync,
    heads: usize,
    len: usize,
    width: usize,
    d: usize,
    col: impl Fn(usize) -> usize + Sync,
) {
    out.par_chunks_mut(len * width)
        .enumerate()
        .for_each(|(b, seq)| {
            for head in 0..heads {
                let blk = block(b * heads + head);
                let c = col(head);
                for (row, src) in seq.chunks_exact_mut(width).zip(blk.chunks_exact(d)) {
                    row[c..c + d].copy_from_slice(src);
                }
            }
        });
}

thread_local! {
    /// A task's packed keys, packed values and probabilities.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// The forward pass without dropout on CPUs with AVX-512F: both products of each pair run
/// [`super::packed_linear`]'s kernel (keys and values packed per pair, 2·L·d values), the
/// probabilities live in a per-thread buffer, and each pair writes its context straight into
/// its columns of the output. The backward pass recomputes the probabilities with the general
/// product, which rounds differently in the last bits.
fn forward_fast(
    spec: &AttentionSpec,
    qkv: &[f32],
    mask: &[f32],
    n: usize,
    len: usize,
    h: usize,
    d: usize,
) -> Vec<f32> {
    use super::packed_linear::{block, pack_kn, pack_nk, Epilogue};
    // 12 × 32 micro-tiles: a head is 32 to 128 values wide.
    const NV: usize = 2;
    const NR: usize = 16 * NV;
    let mut out: Vec<f32> = Vec::with_capacity(n * len * h);
    // SAFETY: every element is written below, by the one pair whose columns hold it.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(n * len * h)
    };
    let dst = super::kernels::DstPtr(out.as_mut_ptr());
    let scale = 1.0 / (d as f32).sqrt();
    (0..n * spec.heads).into_par_iter().for_each(|i| {
        let pair = Pair::new(i, spec.heads, len, h, d);
        SCRATCH.with(|s| {
            let [keys, values, p] = &mut *s.borrow_mut();
            p.resize(len * len, 0.0);
            pack_nk::<NV>(&qkv[pair.at(1)..], 3 * h, len, d, keys);
            pack_kn::<NV>(&qkv[pair.at(2)..], 3 * h, len, d, values);
            let o = pair.b * len * h + pair.head * d;
            // SAFETY: AVX-512F was checked by the caller; `p` is this thread's, and the
            // context's rows b·L.., columns head·d..+d belong to this pair alone.
            unsafe {
                block::<NV>(
                    &qkv[pair.at(0)..],
                    3 * h,
                    0..len,
                    d,
                    keys,
                    0..len.div_ceil(NR),
                    len,
                    None,
                    super::kernels::DstPtr(p.as_mut_ptr()),
                    len,
                    Epilogue::None,
                );
                let keep = &mask[pair.b * len..(pair.b + 1) * len];
                for row in p.chunks_exact_mut(len) {
                    super::vecmath::softmax_masked(row, keep, scale);
                }
                block::<NV>(
                    p,
                    len,
                    0..len,
                    len,
                    values,
                    0..d.div_ceil(NR),
                    d,
                    None,
                    super::kernels::DstPtr(dst.at(o)),
                    h,
                    Epilogue::None,
                );
            }
        });
    });
    out
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "wick-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.0;
        let (n, len, h, d) = dims(spec, l1, l2)?;
        let qkv = op_f32(s1, l1, "attention", "the packed projections")?;
        let mask = op_f32(s2, l2, "attention", "the mask")?;
        if spec.dropout <= 0.0 && super::packed_linear::enabled() {
            let out = forward_fast(spec, qkv, mask, n, len, h, d);
            return Ok((CpuStorage::F32(out), Shape::from((n, len, h))));
        }
        let blocks: Vec<Vec<f32>> = (0..n * spec.heads)
            .into_par_iter()
            .map(|i| {
                let pair = Pair::new(i, spec.heads, len, h, d);
                let mut p = vec![0f32; len * len];
                pair.probs(qkv, mask, &mut p);
                pair.drop(spec, &mut p);
                let mut o = vec![0f32; len * d];
                gemm_tiled(
                    len,
                    d,
                    len,
                    &mut o,
                    d,
                    false,
                    &p,
                    len,
                    1,
                    &qkv[pair.at(2)..],
                    3 * h,
                    1,
                );
                o
            })
            .collect();
        let mut out = vec![0f32; n * len * h];
        scatter(
            &mut out,
            |i| &blocks[i],
            spec.heads,
            len,
            h,
            d,
            |head| head * d,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, len, h))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = qkv.apply_op3_no_bwd(mask, &dout.contiguous()?, &AttentionGrad(self.0))?;
        Ok((Some(g), None))
    }
}

/// The gradient of [`Attention`] with respect to the packed projections.
struct AttentionGrad(AttentionSpec);

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "wick-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.0;
        let (n, len, h, d) = dims(spec, l1, l2)?;
        let qkv = op_f32(s1, l1, "attention backward", "the packed projections")?;
        let mask = op_f32(s2, l2, "attention backward", "the mask")?;
        let dout = op_f32(s3, l3, "attention backward", "the output gradient")?;
        let rs = 3 * h;
        let scale = 1.0 / (d as f32).sqrt();
        let keep_scale = 1.0 / (1.0 - spec.dropout.max(0.0));
        let blocks: Vec<[Vec<f32>; 3]> = (0..n * spec.heads)
            .into_par_iter()
            .map(|i| {
                let pair = Pair::new(i, spec.heads, len, h, d);
                let mut p = vec![0f32; len * len];
                pair.probs(qkv, mask, &mut p);
                let mut pd = p.clone();
                pair.drop(spec, &mut pd);
                let dob = &dout[pair.b * len * h + pair.head * d..];
                // dV = P'ᵀ·dO.
                let mut dv = vec![0f32; len * d];
                gemm_tiled(len, d, len, &mut dv, d, false, &pd, 1, len, dob, h, 1);
                // dP' = dO·Vᵀ, then through dropout and the softmax.
                let mut dp = vec![0f32; len * len];
                gemm_tiled(
                    len,
                    len,
                    d,
                    &mut dp,
                    len,
                    false,
                    dob,
                    h,
                    1,
                    &qkv[pair.at(2)..],
                    1,
                    rs,
                );
                for ((dp, p), pd) in dp
                    .chunks_exact_mut(len)
                    .zip(p.chunks_exact(len))
                    .zip(pd.chunks_exact(len))
                {
                    if spec.dropout > 0.0 {
                        for (g, &k) in dp.iter_mut().zip(pd) {
                            *g = if k != 0.0 { *g * keep_scale } else { 0.0 };
                        }
                    }
                    let dot: f32 = dp.iter().zip(p).map(|(g, p)| g * p).sum();
                    for (g, &p) in dp.iter_mut().zip(p) {
                        *g = p * (*g - dot) * scale;
                    }
                }
                // dQ = dS·K, dK = dSᵀ·Q.
                let mut dq = vec![0f32; len * d];
                gemm_tiled(
                    len,
                    d,
                    len,
                    &mut dq,
                    d,
                    false,
                    &dp,
                    len,
                    1,
                    &qkv[pair.at(1)..],
                    rs,
                    1,
                );
                let mut dk = vec![0f32; len * d];
                gemm_tiled(
                    len,
                    d,
                    len,
                    &mut dk,
                    d,
                    false,
                    &dp,
                    1,
                    len,
                    &qkv[pair.at(0)..],
                    rs,
                    1,
                );
                [dq, dk, dv]
            })
            .collect();
        let mut out = vec![0f32; n * len * rs];
        #[allow(clippy::needless_range_loop)]
        for part in 0..3 {
            scatter(
                &mut out,
                |i| &blocks[i][part],
                spec.heads,
                len,
                rs,
                d,
                |head| part * h + head * d,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, len, rs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    /// The GPU fallback computes the kernel's function: outputs (dropout mask included) and
    /// gradients, with padding.
    #[test]
    fn the_composite_fallback_matches_the_kernel() {
        let (n, len, heads, d) = (2, 5, 2, 3);
        let h = heads * d;
        let mut rng = crate::rng::Rng::keyed(7, "attention-test", 0);
        let vals: Vec<f32> = (0..n * len * 3 * h).map(|_| rng.next_f32() - 0.5).collect();
        let qkv = Var::from_tensor(&Tensor::from_vec(vals, (n, len, 3 * h), &Device::Cpu).unwrap())
            .unwrap();
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let r: Vec<f32> = (0..n * len * h).map(|_| rng.next_f32()).collect();
        let r = Tensor::from_vec(r, (n, len, h), &Device::Cpu).unwrap();
        for dropout in [0.0, 0.3] {
            let spec = AttentionSpec {
                heads,
                dropout,
                seed: 11,
            };
            let a = attention(qkv.as_tensor(), &mask, spec).unwrap();
            let b = attention_composite(qkv.as_tensor(), &mask, spec).unwrap();
            assert!(
                max_diff(&a, &b) < 1e-5,
                "outputs differ by {}",
                max_diff(&a, &b)
            );
            let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (
                ga.get(qkv.as_tensor()).unwrap(),
                gb.get(qkv.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(ga, gb) < 1e-5,
                "gradients differ by {}",
                max_diff(ga, gb)
            );
        }
    }

    #[test]
    fn the_kernel_matches_the_composite_on_heads_wider_than_a_panel() {
        // d = 40 and L = 45: two column panels for both products, partial tiles and panels.
        let (n, len, heads, d) = (2, 45, 2, 40);
        let h = heads * d;
        let mut rng = crate::rng::Rng::keyed(8, "attention-test", 0);
        let vals: Vec<f32> = (0..n * len * 3 * h).map(|_| rng.next_f32() - 0.5).collect();
        let qkv = Tensor::from_vec(vals, (n, len, 3 * h), &Device::Cpu).unwrap();
        let keep: Vec<f32> = (0..n * len)
            .map(|i| if i >= len + 30 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(keep, (n, len), &Device::Cpu).unwrap();
        let spec = AttentionSpec {
            heads,
            dropout: 0.0,
            seed: 3,
        };
        let a = attention(&qkv, &mask, spec).unwrap();
        let b = attention_composite(&qkv, &mask, spec).unwrap();
        assert!(
            max_diff(&a, &b) < 1e-5,
            "outputs differ by {}",
            max_diff(&a, &b)
        );
    }
}
