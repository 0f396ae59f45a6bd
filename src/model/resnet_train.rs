//! A ResNet training step without candle's autograd: the forward pass keeps what its backward
//! pass needs, and the backward pass calls the same kernels as the custom ops' own backward
//! passes (convolution, BatchNorm, max pool), adding each parameter's gradient straight into
//! [`Grads`].
//!
//! candle's backward pass creates a zero tensor for every gradient and adds the op's gradient
//! to it (`or_insert` + `add`: an allocation and three passes over memory per tensor, on
//! candle's own spinning thread pool), and the trainer then copies the gradients out. For
//! ResNet-18 at batch 16 × 64×64 that is about 75 MB of gradients per step, each written
//! four times. Here each is written once.
//!
//! It serves the common case (every parameter trained, the linear head, cross-entropy, no
//! dropout, on the CPU); anything else goes through autograd, which computes the same function.

use super::Model;

use super::batchnorm::{train_backward, train_forward, Saved};
use super::conv::{conv2d_backward_input, conv2d_backward_weight_add, conv2d_forward};
use super::kernels::{add_into, gemm, with_f32};
use super::pool::{max_pool_backward, max_pool_forward, PoolSpec};
use super::resnet::{ConvBn, Freeze, ResNet, STEM};
use super::{Grads, Loss, ModelCtx};
use crate::data::Batch;
use crate::Result;

/// The stem's max pool.
const POOL: PoolSpec = PoolSpec {
    kernel: 3,
    stride: 2,
    padding: 1,
};

/// What one `conv → BatchNorm (→ ReLU)` keeps for its backward pass.
struct ConvBnTape {
    /// Index of the convolution's input in [`Tape::acts`].
    input: usize,
    /// Dims of the input (NHWC).
    in_dims: [usize; 4],
    /// The convolution's output (BatchNorm's input) and the BatchNorm's output.
    z: Vec<f32>,
    y: usize,
    saved: Saved,
    relu: bool,
}

/// Activations of one forward pass, by index.
#[derive(Default)]
struct Tape {
    acts: Vec<Vec<f32>>,
}

impl Tape {
    fn push(&mut self, v: Vec<f32>) -> usize {
        self.acts.push(v);
        self.acts.len() - 1
    }
}

/// A parameter's f32 values as a slice, for `f`.
fn with_param<R>(net: &ResNet, name: &str, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let v = net
        .store()
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("resnet: no parameter `{name}`")))?;
    with_f32(v.as_tensor(), f).ok_or_else(|| {
        candle_core::Error::Msg(format!("resnet: `{name}` is not contiguous f32 on the CPU"))
    })
}

/// Adds `g` into the gradient buffer of `name`.
fn add_grad(grads: &mut Grads, name: &str, g: &[f32]) -> candle_core::Result<()> {
    let buf = grads.get_mut(name).ok_or_else(|| {
        candle_core::Error::Msg(format!("resnet: no gradient buffer for `{name}`"))
    })?;
    if buf.len() != g.len() {
        candle_core::bail!(
            "resnet: gradient of `{name}` has {} values, not {}",
            g.len(),
            buf.len()
        );
    }
    add_into(buf, g);
    Ok(())
}

impl ResNet {
    /// Whether [`Self::native_loss_and_grad`] computes this step (otherwise autograd does).
    pub(crate) fn native_step(&self, batch: &Batch, loss: Loss, ctx: &ModelCtx) -> bool {
        let cfg = self.config();
        loss == Loss::CrossEntropy
            && cfg.freeze == Freeze::None
            && cfg.head_hidden.is_none()
            && cfg.dropout == 0.0
            && ctx.is_train()
            && !ctx.features_cached()
            && batch.mask.is_none()
            && batch.x.device().is_cpu()
            && !self.store().is_quantized()
    }

    /// `conv → BatchNorm (training mode, running statistics updated) → ReLU when `relu``.
    fn conv_bn_train(
        &self,
        tape: &mut Tape,
        input: usize,
        in_dims: [usize; 4],
        l: &ConvBn,
        relu: bool,
    ) -> candle_core::Result<(ConvBnTape, [usize; 4])> {
        let wname = format!("{}.weight", l.conv);
        let ws = self.weight_dims(&wname)?;
        let x = &tape.acts[input];
        let (z, dims) = with_param(self, &wname, |w| {
            conv2d_forward(x, &in_dims, w, &ws, l.spec)
        })??;
        let bn = self.batch_norm(&l.bn)?;
        let gamma = with_param(self, &format!("{}.weight", l.bn), <[f32]>::to_vec)?;
        let beta = with_param(self, &format!("{}.bias", l.bn), <[f32]>::to_vec)?;
        let (y, saved) = train_forward(&z, &gamma, &beta, bn.eps as f32, relu);
        bn.track(&saved.mean, &saved.var, z.len() / gamma.len().max(1))?;
        let y = tape.push(y);
        Ok((
            ConvBnTape {
                input,
                in_dims,
                z,
                y,
                saved,
                relu,
            },
            dims,
        ))
    }

    /// The backward pass of [`Self::conv_bn_train`] from the gradient `dy` of its output:
    /// adds the weight, gamma and beta gradients, returns the input's gradient if `need_dx`.
    fn conv_bn_backward(
        &self,
        tape: &Tape,
        t: &ConvBnTape,
        l: &ConvBn,
        dy: &[f32],
        grads: &mut Grads,
        need_dx: bool,
    ) -> candle_core::Result<Option<Vec<f32>>> {
        let gname = format!("{}.weight", l.bn);
        let gamma = with_param(self, &gname, <[f32]>::to_vec)?;
        let (dz, dgamma, dbeta) =
            train_backward(&t.z, &tape.acts[t.y], dy, &t.saved, &gamma, t.relu, true);
        let dz = dz.expect("train_backward returns dx when asked");
        add_grad(grads, &gname, &dgamma)?;
        add_grad(grads, &format!("{}.bias", l.bn), &dbeta)?;
        let wname = format!("{}.weight", l.conv);
        let ws = self.weight_dims(&wname)?;
        let x = &tape.acts[t.input];
        let buf = grads.get_mut(&wname).ok_or_else(|| {
            candle_core::Error::Msg(format!("resnet: no gradient buffer for `{wname}`"))
        })?;
        conv2d_backward_weight_add(x, &t.in_dims, &dz, &ws, l.spec, buf)?;
        if !need_dx {
            return Ok(None);
        }
        let dx = with_param(self, &wname, |w| {
            conv2d_backward_input(&dz, &t.in_dims, w, &ws, l.spec)
        })??;
        Ok(Some(dx))
    }

    /// The `[out, in, kh, kw]` dims of convolution weight `name`.
    fn weight_dims(&self, name: &str) -> candle_core::Result<[usize; 4]> {
        let v = self
            .store()
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("resnet: no parameter `{name}`")))?;
        <[usize; 4]>::try_from(v.dims())
            .map_err(|_| candle_core::Error::Msg(format!("resnet: `{name}` is not 4-d")))
    }

    /// One training step of the whole network on `batch` with cross-entropy: adds `scale ×`
    /// the gradient of the mean loss to `grads`, updates the running statistics, returns the
    /// loss. The caller checks [`Self::native_step`].
    pub(crate) fn native_loss_and_grad(
        &self,
        batch: &Batch,
        grads: &mut Grads,
        scale: f32,
    ) -> Result<f64> {
        Ok(self.native_step_inner(batch, grads, scale)?)
    }

    fn native_step_inner(
        &self,
        batch: &Batch,
        grads: &mut Grads,
        scale: f32,
    ) -> candle_core::Result<f64> {
        let mut tape = Tape::default();
        // Stem: conv → BN → ReLU → max pool.
        let x = self.nhwc_input(&batch.x)?;
        let in_dims = <[usize; 4]>::try_from(x.dims())
            .map_err(|_| candle_core::Error::Msg("resnet: input is not 4-d".into()))?;
        let x0 = tape.push(x.flatten_all()?.to_vec1::<f32>()?);
        let stem = ConvBn {
            conv: "conv1".into(),
            bn: "bn1".into(),
            spec: STEM,
        };
        let (stem_t, stem_dims) = self.conv_bn_train(&mut tape, x0, in_dims, &stem, true)?;
        let (pooled, arg, mut dims) = max_pool_forward(&tape.acts[stem_t.y], stem_dims, POOL)?;
        let mut cur = tape.push(pooled);
        // Blocks: each keeps its layers' tapes, its input and output.
        struct BlockTape {
            layers: Vec<ConvBnTape>,
            down: Option<ConvBnTape>,
            out: usize,
            in_dims: [usize; 4],
        }
        let mut blocks = Vec::with_capacity(self.block_list().len());
        for b in self.block_list() {
            let (input, in_dims) = (cur, dims);
            let mut layers = Vec::with_capacity(b.layers.len());
            let (mut h, mut hd) = (input, in_dims);
            let last = b.layers.len() - 1;
            for (i, l) in b.layers.iter().enumerate() {
                let (t, d) = self.conv_bn_train(&mut tape, h, hd, l, i < last)?;
                (h, hd) = (t.y, d);
                layers.push(t);
            }
            let down = match &b.downsample {
                Some(d) => Some(self.conv_bn_train(&mut tape, input, in_dims, d, false)?.0),
                None => None,
            };
            let skip = down.as_ref().map_or(input, |t| t.y);
            if tape.acts[skip].len() != tape.acts[h].len() {
                candle_core::bail!("resnet: a block's shortcut and output differ in size");
            }
            let out: Vec<f32> = tape.acts[h]
                .iter()
                .zip(&tape.acts[skip])
                .map(|(a, b)| (a + b).max(0.0))
                .collect();
            cur = tape.push(out);
            dims = hd;
            blocks.push(BlockTape {
                layers,
                down,
                out: cur,
                in_dims,
            });
        }
        // Global average pool and the head.
        let [n, h, w, c] = dims;
        let hw = (h * w) as f32;
        let mut feats = vec![0f32; n * c];
        for (f, img) in feats
            .chunks_exact_mut(c)
            .zip(tape.acts[cur].chunks_exact(h * w * c))
        {
            let mut acc = vec![0f64; c];
            for px in img.chunks_exact(c) {
                acc.iter_mut().zip(px).for_each(|(a, &v)| *a += v as f64);
            }
            f.iter_mut()
                .zip(&acc)
                .for_each(|(f, &a)| *f = (a / hw as f64) as f32);
        }
        let ncls = self.config().num_classes;
        let mut logits = vec![0f32; n * ncls];
        with_param(self, "fc.weight", |wt| {
            gemm(n, ncls, c, &mut logits, false, &feats, c, 1, wt, 1, c)
        })?;
        with_param(self, "fc.bias", |b| {
            for row in logits.chunks_exact_mut(ncls) {
                row.iter_mut().zip(b).for_each(|(l, &b)| *l += b);
            }
        })?;
        // Cross-entropy (mean over the batch) and its gradient, scaled.
        let y: Vec<u32> = batch.y.to_vec1()?;
        if y.len() != n {
            candle_core::bail!("resnet: {} labels for {n} images", y.len());
        }
        let mut dl = vec![0f32; n * ncls];
        let loss = super::cross_entropy_grad(&logits, &y, ncls, scale, &mut dl)?;

        // Backward: the head.
        {
            let gw = grads.get_mut("fc.weight").ok_or_else(|| {
                candle_core::Error::Msg("resnet: no gradient buffer for `fc.weight`".into())
            })?;
            gemm(ncls, c, n, gw, true, &dl, 1, ncls, &feats, c, 1);
        }
        let mut db = vec![0f32; ncls];
        for row in dl.chunks_exact(ncls) {
            db.iter_mut().zip(row).for_each(|(g, &d)| *g += d);
        }
        add_grad(grads, "fc.bias", &db)?;
        let mut dfeats = vec![0f32; n * c];
        with_param(self, "fc.weight", |wt| {
            gemm(n, c, ncls, &mut dfeats, false, &dl, ncls, 1, wt, c, 1)
        })?;
        // The average pool spreads each feature's gradient over its pixels.
        let mut dcur: Vec<f32> = Vec::with_capacity(n * h * w * c);
        for f in dfeats.chunks_exact(c) {
            for _ in 0..h * w {
                dcur.extend(f.iter().map(|&g| g / hw));
            }
        }
        // The blocks, last first.
        for (b, bt) in self.block_list().iter().zip(&blocks).rev() {
            // out = relu(main + skip): both branches get dout · [out > 0].
            let dsum: Vec<f32> = dcur
                .iter()
                .zip(&tape.acts[bt.out])
                .map(|(&d, &o)| if o > 0.0 { d } else { 0.0 })
                .collect();
            let mut dh = dsum.clone();
            for (l, t) in b.layers.iter().zip(&bt.layers).rev() {
                dh = self
                    .conv_bn_backward(&tape, t, l, &dh, grads, true)?
                    .expect("asked for the input gradient");
            }
            match (&b.downsample, &bt.down) {
                (Some(l), Some(t)) => {
                    let dskip = self
                        .conv_bn_backward(&tape, t, l, &dsum, grads, true)?
                        .expect("asked for the input gradient");
                    dh.iter_mut().zip(&dskip).for_each(|(a, &b)| *a += b);
                }
                _ => dh.iter_mut().zip(&dsum).for_each(|(a, &b)| *a += b),
            }
            debug_assert_eq!(dh.len(), bt.in_dims.iter().product::<usize>());
            dcur = dh;
        }
        // The max pool, then the stem (no gradient for the images).
        let dstem = max_pool_backward(&arg, &dcur, stem_dims[0], stem_dims[1..].iter().product());
        self.conv_bn_backward(&tape, &stem_t, &stem, &dstem, grads, false)?;
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResnetArch;
    use crate::model::{autograd_loss_and_grad, ParamStore, ResNetConfig};
    use crate::rng::Rng;
    use candle_core::Tensor;

    fn net(width: usize, arch: ResnetArch) -> ResNet {
        ResNet::new(
            ParamStore::new(5),
            ResNetConfig {
                arch,
                width,
                num_classes: 7,
                in_channels: 3,
                input_shape: [3, 20, 20],
                head_hidden: None,
                dropout: 0.0,
                freeze: Freeze::None,
                stages: 4,
            },
        )
        .unwrap()
    }

    /// The native step computes what autograd computes: loss, every gradient (scaled and
    /// added), and the running statistics.
    #[test]
    fn native_step_matches_autograd() {
        let dev = candle_core::Device::Cpu;
        // Width 32: the direct convolution kernel where the CPU has it; 8: im2col + GEMM.
        for (width, arch) in [
            (32, ResnetArch::Resnet18),
            (8, ResnetArch::Resnet18),
            (8, ResnetArch::Resnet50),
        ] {
            let (a, b) = (net(width, arch), net(width, arch));
            let mut r = Rng::new(9);
            let n = 5;
            let x: Vec<f32> = (0..n * 3 * 20 * 20).map(|_| r.normal() as f32).collect();
            let batch = Batch {
                x: Tensor::from_vec(x, (n, 3 * 20 * 20), &dev).unwrap(),
                y: Tensor::from_vec((0..n as u32).map(|i| i % 7).collect::<Vec<_>>(), n, &dev)
                    .unwrap(),
                n,
                mask: None,
            };
            let pa = a.store().trainable();
            let pb = b.store().trainable();
            let mut ga = Grads::zeros(&pa);
            let mut gb = Grads::zeros(&pb);
            // Non-zero starting gradients: both paths add into them.
            ga.flat_mut().fill(0.25);
            gb.flat_mut().fill(0.25);
            let mut ctx = ModelCtx::train(0, 0);
            assert!(a.native_step(&batch, Loss::CrossEntropy, &ctx));
            let la = a.native_loss_and_grad(&batch, &mut ga, 0.5).unwrap();
            let lb =
                autograd_loss_and_grad(&b, &batch, Loss::CrossEntropy, &mut ctx, &pb, &mut gb, 0.5)
                    .unwrap();
            assert!(
                (la - lb).abs() < 1e-5 * lb.abs().max(1.0),
                "loss {la} vs {lb}"
            );
            for ((name, x), y) in ga.names.iter().zip(ga.bufs()).zip(gb.bufs()) {
                let diff = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                let scale = y.iter().map(|v| (v - 0.25).abs()).fold(0f32, f32::max);
                assert!(
                    diff <= 1e-4 * scale.max(1e-3),
                    "width {width} {arch:?}: gradient of {name} differs by {diff} (scale {scale})"
                );
            }
            for p in a.store().buffers() {
                let u: Vec<f32> = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let v: Vec<f32> = b
                    .store()
                    .get(&p.name)
                    .unwrap()
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let diff = u
                    .iter()
                    .zip(&v)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-5,
                    "{}: running statistics differ by {diff}",
                    p.name
                );
            }
        }
    }
}
