//! The multi-layer perceptron (`[model] kind = "mlp"`).
//!
//! Parameters are named like a PyTorch `nn.ModuleList` called `layers`: `layers.0.weight`
//! (`[out, in]`), `layers.0.bias`, … and initialised as `torch.nn.Linear` does
//! (U(-1/√fan_in, 1/√fan_in) for weights and biases).
//!
//! The forward pass is plain candle (it runs on any device and is what eval and predict use).
//! Training on the CPU takes a fused path instead: forward and backward of the whole network
//! over preallocated buffers with one GEMM per product, no autograd graph and no per-op
//! allocation. candle's per-op overhead dominates at MLP sizes, and this path is what makes
//! wick faster than PyTorch here. Tests check it against candle's autograd.

use candle_core::{Device, Tensor, Var};
use candle_nn::Init;

use super::kernels::{cpu_f32, gemm};
use super::{autograd_loss_and_grad, Grads, Loss, Model, ModelCtx, Param, ParamStore};
use crate::config::Activation;
use crate::data::Batch;
use crate::Result;

/// A fully connected network with an activation (and optional dropout) after each hidden layer.
pub struct Mlp {
    store: ParamStore,
    /// (weight `[out, in]`, bias `[out]`) per layer.
    layers: Vec<(Var, Var)>,
    names: Vec<(String, String)>,
    activation: Activation,
    dropout: f32,
}

impl Mlp {
    /// Builds `inputs → hidden… → outputs` in `store`.
    pub fn new(
        store: ParamStore,
        inputs: usize,
        hidden: &[usize],
        outputs: usize,
        activation: Activation,
        dropout: f32,
    ) -> candle_core::Result<Self> {
        let vb = store.var_builder();
        let mut dims = vec![inputs];
        dims.extend_from_slice(hidden);
        dims.push(outputs);
        let mut layers = Vec::new();
        let mut names = Vec::new();
        for (i, w) in dims.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let init = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let wn = format!("layers.{i}.weight");
            let bn = format!("layers.{i}.bias");
            vb.get_with_hints((fan_out, fan_in), &wn, init)?;
            vb.get_with_hints(fan_out, &bn, init)?;
            let wv = store.get(&wn).expect("just created");
            let bv = store.get(&bn).expect("just created");
            layers.push((wv, bv));
            names.push((wn, bn));
        }
        Ok(Self {
            store,
            layers,
            names,
            activation,
            dropout,
        })
    }

    fn activate(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.activation {
            Activation::Relu => xs.relu(),
            Activation::Tanh => xs.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(xs),
            Activation::Gelu => xs.gelu_erf(),
        }
    }

    /// Whether the fused CPU training path applies.
    fn native(&self, batch: &Batch) -> bool {
        matches!(batch.x.device(), Device::Cpu)
            && self.activation != Activation::Gelu
            && self.store.trainable().len() == self.layers.len() * 2
    }

    fn native_loss_and_grad(
        &self,
        batch: &Batch,
        loss: Loss,
        ctx: &mut ModelCtx,
        grads: &mut Grads,
        scale: f32,
    ) -> Result<f64> {
        let n = batch.n;
        let guards: Vec<_> = self
            .layers
            .iter()
            .flat_map(|(w, b)| {
                [
                    w.as_tensor().storage_and_layout(),
                    b.as_tensor().storage_and_layout(),
                ]
            })
            .collect();
        let params: Vec<&[f32]> = guards
            .iter()
            .map(|(s, l)| cpu_f32(s, l).expect("MLP parameters are contiguous f32 on the CPU"))
            .collect();
        let xg = batch.x.storage_and_layout();
        let x = cpu_f32(&xg.0, xg.1).ok_or_else(|| {
            crate::Error::Train("MLP input must be a contiguous f32 CPU tensor".into())
        })?;
        let nl = self.layers.len();
        let dims: Vec<usize> = std::iter::once(self.layers[0].0.dims()[1])
            .chain(self.layers.iter().map(|(w, _)| w.dims()[0]))
            .collect();

        // Forward. `hs[l]` is the activation of hidden layer l (before dropout), `masks[l]` its
        // dropout mask, `ins[l]` the input of layer l+1.
        let mut hs: Vec<Vec<f32>> = Vec::with_capacity(nl);
        let mut masks: Vec<Option<Vec<f32>>> = Vec::with_capacity(nl);
        let mut dropped: Vec<Option<Vec<f32>>> = Vec::with_capacity(nl);
        let mut out = Vec::new();
        for l in 0..nl {
            let (din, dout) = (dims[l], dims[l + 1]);
            let input: &[f32] = if l == 0 {
                x
            } else {
                dropped[l - 1].as_deref().unwrap_or(&hs[l - 1])
            };
            let (w, b) = (params[2 * l], params[2 * l + 1]);
            let mut z = vec![0f32; n * dout];
            for row in z.chunks_exact_mut(dout) {
                row.copy_from_slice(b);
            }
            gemm(n, dout, din, &mut z, true, input, din, 1, w, 1, din);
            if l + 1 == nl {
                out = z;
                break;
            }
            apply_activation(self.activation, &mut z);
            if ctx.is_train() && self.dropout > 0.0 {
                let mask = ctx.dropout_mask(z.len(), self.dropout);
                dropped.push(Some(z.iter().zip(&mask).map(|(a, m)| a * m).collect()));
                masks.push(Some(mask));
            } else {
                dropped.push(None);
                masks.push(None);
            }
            hs.push(z);
        }

        // Loss and its gradient with respect to the output.
        let dout = dims[nl];
        let mut dz = vec![0f32; n * dout];
        let loss_value = match loss {
            Loss::CrossEntropy => {
                let y: Vec<u32> = batch.y.to_vec1()?;
                super::cross_entropy_grad(&out, &y, dout, scale, &mut dz)?
            }
            Loss::Mse => {
                let y = batch.y.flatten_all()?.to_vec1::<f32>()?;
                let cnt = (n * dout) as f32;
                let mut total = 0f64;
                for ((d, &o), &t) in dz.iter_mut().zip(&out).zip(&y) {
                    let e = o - t;
                    total += (e * e) as f64;
                    *d = 2.0 * e / cnt * scale;
                }
                total / cnt as f64
            }
        };

        // Backward.
        for l in (0..nl).rev() {
            let (din, dout) = (dims[l], dims[l + 1]);
            let input: &[f32] = if l == 0 {
                x
            } else {
                dropped[l - 1].as_deref().unwrap_or(&hs[l - 1])
            };
            let (wname, bname) = &self.names[l];
            {
                let gw = grads.get_mut(wname).expect("grad buffer per parameter");
                gemm(dout, din, n, gw, true, &dz, 1, dout, input, din, 1);
            }
            {
                let gb = grads.get_mut(bname).expect("grad buffer per parameter");
                for row in dz.chunks_exact(dout) {
                    for (g, &d) in gb.iter_mut().zip(row) {
                        *g += d;
                    }
                }
            }
            if l == 0 {
                break;
            }
            let w = params[2 * l];
            let mut da = vec![0f32; n * din];
            gemm(n, din, dout, &mut da, false, &dz, dout, 1, w, din, 1);
            if let Some(mask) = &masks[l - 1] {
                da.iter_mut().zip(mask).for_each(|(d, m)| *d *= m);
            }
            activation_backward(self.activation, &mut da, &hs[l - 1]);
            dz = da;
        }
        Ok(loss_value)
    }
}

fn apply_activation(act: Activation, z: &mut [f32]) {
    match act {
        Activation::Relu => z.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Tanh => z.iter_mut().for_each(|v| *v = v.tanh()),
        Activation::Sigmoid => z.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        Activation::Gelu => unreachable!("gelu trains through autograd"),
    }
}

/// Multiplies `da` by the activation's derivative, given the activation's output `h`.
fn activation_backward(act: Activation, da: &mut [f32], h: &[f32]) {
    match act {
        Activation::Relu => da
            .iter_mut()
            .zip(h)
            .for_each(|(d, &a)| *d = if a > 0.0 { *d } else { 0.0 }),
        Activation::Tanh => da.iter_mut().zip(h).for_each(|(d, &a)| *d *= 1.0 - a * a),
        Activation::Sigmoid => da.iter_mut().zip(h).for_each(|(d, &a)| *d *= a * (1.0 - a)),
        Activation::Gelu => unreachable!("gelu trains through autograd"),
    }
}

impl Model for Mlp {
    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn kind(&self) -> &str {
        "mlp"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut ModelCtx) -> candle_core::Result<Tensor> {
        let mut h = xs.clone();
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let wname = format!("layers.{i}.weight");
            h = crate::quant::linear_or(&self.store, &wname, &h, Some(b.as_tensor()), || {
                h.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())
            })?;
            if i < last {
                h = self.activate(&h)?;
                h = ctx.dropout(&h, self.dropout)?;
            }
        }
        Ok(h)
    }

    fn quant_layers(&self) -> Vec<crate::quant::QuantLayer> {
        (0..self.layers.len())
            .map(|i| crate::quant::QuantLayer::linear(format!("layers.{i}.weight")))
            .collect()
    }

    fn loss_and_grad(
        &self,
        batch: &Batch,
        loss: Loss,
        ctx: &mut ModelCtx,
        params: &[Param],
        grads: &mut Grads,
        scale: f32,
    ) -> Result<f64> {
        if self.native(batch) {
            self.native_loss_and_grad(batch, loss, ctx, grads, scale)
        } else {
            autograd_loss_and_grad(self, batch, loss, ctx, params, grads, scale)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn check(act: Activation, loss: Loss, dropout: f32) {
        let store = ParamStore::new(5);
        let mlp = Mlp::new(store.clone(), 7, &[16, 9], 4, act, dropout).unwrap();
        let n = 13;
        let mut r = Rng::new(9);
        let x: Vec<f32> = (0..n * 7).map(|_| r.normal() as f32).collect();
        let x = Tensor::from_vec(x, (n, 7), &Device::Cpu).unwrap();
        let y = match loss {
            Loss::CrossEntropy => Tensor::from_vec(
                (0..n as u32).map(|i| i % 4).collect::<Vec<_>>(),
                n,
                &Device::Cpu,
            )
            .unwrap(),
            Loss::Mse => Tensor::from_vec(
                (0..n * 4).map(|_| r.normal() as f32).collect::<Vec<_>>(),
                (n, 4),
                &Device::Cpu,
            )
            .unwrap(),
        };
        let batch = Batch {
            x,
            y,
            n,
            mask: None,
        };
        let params = store.trainable();
        let mut g1 = Grads::zeros(&params);
        let mut g2 = Grads::zeros(&params);
        let l1 = mlp
            .native_loss_and_grad(&batch, loss, &mut ModelCtx::train(1, 3), &mut g1, 0.5)
            .unwrap();
        let l2 = autograd_loss_and_grad(
            &mlp,
            &batch,
            loss,
            &mut ModelCtx::train(1, 3),
            &params,
            &mut g2,
            0.5,
        )
        .unwrap();
        assert!(
            (l1 - l2).abs() < 1e-5 * l2.abs().max(1.0),
            "loss {l1} vs {l2}"
        );
        for (name, (a, b)) in g1.names.iter().zip(g1.bufs().zip(g2.bufs())) {
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale.max(1.0) + 1e-6,
                    "{name}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn native_gradients_match_autograd() {
        for act in [Activation::Relu, Activation::Tanh, Activation::Sigmoid] {
            check(act, Loss::CrossEntropy, 0.0);
            check(act, Loss::Mse, 0.0);
            check(act, Loss::CrossEntropy, 0.3);
        }
    }

    #[test]
    fn parameter_names_mirror_pytorch() {
        let store = ParamStore::new(0);
        Mlp::new(store.clone(), 4, &[8], 3, Activation::Relu, 0.0).unwrap();
        let names: Vec<String> = store.params().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "layers.0.bias",
                "layers.0.weight",
                "layers.1.bias",
                "layers.1.weight"
            ]
        );
        assert_eq!(store.get("layers.0.weight").unwrap().dims(), &[8, 4]);
    }
}
