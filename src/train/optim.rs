//! Optimizers with PyTorch semantics, updating parameters in place, and with state that can
//! be saved and restored exactly.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::config::{OptimConfig, OptimKind};
use crate::model::kernels::update_in_place;
use crate::model::{Grads, Param};
use crate::{Error, Result};

/// SGD (momentum, dampening, Nesterov, L2 weight decay) or AdamW (decoupled weight decay),
/// matching `torch.optim.SGD` and `torch.optim.AdamW`.
#[derive(Debug, Clone)]
pub struct Optimizer {
    cfg: OptimConfig,
    /// Number of steps taken.
    step: u64,
    /// Per parameter (in `Grads` order): AdamW `exp_avg`/`exp_avg_sq`, SGD `momentum_buffer`.
    state: Vec<ParamState>,
    decay: Vec<bool>,
}

#[derive(Debug, Clone, Default)]
struct ParamState {
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    momentum_buffer: Vec<f32>,
}

impl Optimizer {
    pub fn new(cfg: &OptimConfig, params: &[Param]) -> Self {
        let decay = params
            .iter()
            .map(|p| !cfg.no_decay.iter().any(|s| p.name.contains(s.as_str())))
            .collect();
        Self {
            cfg: cfg.clone(),
            step: 0,
            state: vec![ParamState::default(); params.len()],
            decay,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update with learning rate `lr`. Parameters are updated in parallel, each
    /// element independently, so the result does not depend on the thread count.
    pub fn step(&mut self, params: &[Param], grads: &Grads, lr: f64) -> Result<()> {
        use rayon::prelude::*;
        self.step += 1;
        let wd_all = self.cfg.weight_decay();
        let cfg = &self.cfg;
        let step = self.step;
        let work: Vec<(usize, &Param, &[f32], &mut ParamState)> = params
            .iter()
            .zip(grads.bufs())
            .zip(self.state.iter_mut())
            .enumerate()
            .map(|(i, ((p, g), st))| (i, p, g, st))
            .collect();
        let decay = &self.decay;
        let update = |(i, p, g, st): (usize, &Param, &[f32], &mut ParamState)| -> Result<()> {
            let wd = if decay[i] { wd_all } else { 0.0 };
            match cfg.kind {
                OptimKind::Adamw => {
                    if st.exp_avg.is_empty() {
                        st.exp_avg = vec![0.0; g.len()];
                        st.exp_avg_sq = vec![0.0; g.len()];
                    }
                    let [b1, b2] = cfg.betas;
                    let bc1 = 1.0 - b1.powi(step as i32);
                    let bc2 = 1.0 - b2.powi(step as i32);
                    let step_size = (lr / bc1) as f32;
                    let bc2_sqrt = bc2.sqrt() as f32;
                    let decay = (1.0 - lr * wd) as f32;
                    // 1 - β in f64 first, as PyTorch does in Python floats.
                    let c = AdamConsts {
                        decay,
                        b2: b2 as f32,
                        one_minus_b1: (1.0 - b1) as f32,
                        one_minus_b2: (1.0 - b2) as f32,
                        eps: cfg.eps as f32,
                        step_size,
                        bc2_sqrt,
                    };
                    let (m, v) = (&mut st.exp_avg, &mut st.exp_avg_sq);
                    update_in_place(p.var.as_tensor(), |w| adamw_kernel(w, g, m, v, &c))
                }
                OptimKind::Sgd => {
                    let c = SgdConsts {
                        lr: lr as f32,
                        wd: wd as f32,
                        mom: cfg.momentum as f32,
                        damp: cfg.dampening as f32,
                        nesterov: cfg.nesterov,
                        first: st.momentum_buffer.is_empty() && cfg.momentum != 0.0,
                    };
                    if c.first {
                        st.momentum_buffer = vec![0.0; g.len()];
                    }
                    let buf = &mut st.momentum_buffer;
                    update_in_place(p.var.as_tensor(), |w| sgd_kernel(w, g, buf, &c))
                }
            }
        };
        let total = grads.flat().len();
        if total >= PARALLEL_MIN_PARAMS && rayon::current_num_threads() > 1 {
            work.into_par_iter().try_for_each(update)
        } else {
            work.into_iter().try_for_each(update)
        }
    }

    /// The state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`,
    /// `<param>.momentum_buffer`, and `step`), for the checkpoint.
    pub fn state_tensors(&self, params: &[Param]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let dev = Device::Cpu;
        for (p, st) in params.iter().zip(&self.state) {
            let shape = p.var.dims();
            for (suffix, v) in [
                ("exp_avg", &st.exp_avg),
                ("exp_avg_sq", &st.exp_avg_sq),
                ("momentum_buffer", &st.momentum_buffer),
            ] {
                if !v.is_empty() {
                    out.push((
                        format!("{}.{suffix}", p.name),
                        Tensor::from_slice(v, shape, &dev)?,
                    ));
                }
            }
        }
        out.push((
            "step".to_string(),
            Tensor::from_slice(&[self.step as i64], 1, &dev)?,
        ));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Restores state saved by [`Self::state_tensors`].
    pub fn load_state(
        &mut self,
        params: &[Param],
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let bad = |msg: String| {
            Error::Checkpoint(format!("optimizer state: {msg}; the checkpoint is corrupt"))
        };
        let step = tensors
            .get("step")
            .ok_or_else(|| bad("no `step`".into()))?
            .to_dtype(candle_core::DType::I64)?
            .to_vec1::<i64>()?;
        let [step] = step[..] else {
            return Err(bad(format!("`step` has {} values, expected 1", step.len())));
        };
        self.step = u64::try_from(step).map_err(|_| bad(format!("`step` is {step}")))?;
        let needs: &[&str] = match self.cfg.kind {
            OptimKind::Adamw => &["exp_avg", "exp_avg_sq"],
            OptimKind::Sgd if self.cfg.momentum != 0.0 => &["momentum_buffer"],
            OptimKind::Sgd => &[],
        };
        if self.step > 0 {
            for p in params {
                for suffix in needs {
                    let key = format!("{}.{suffix}", p.name);
                    if !tensors.contains_key(&key) {
                        return Err(bad(format!("`{key}` is missing")));
                    }
                }
            }
        }
        for (p, st) in params.iter().zip(self.state.iter_mut()) {
            let get = |suffix: &str| -> Result<Vec<f32>> {
                match tensors.get(&format!("{}.{suffix}", p.name)) {
                    Some(t) => {
                        if t.elem_count() != p.var.elem_count() {
                            return Err(Error::Checkpoint(format!(
                                "optimizer state `{}.{suffix}` has {} values, the parameter {}",
                                p.name,
                                t.elem_count(),
                                p.var.elem_count()
                            )));
                        }
                        Ok(t.flatten_all()?.to_vec1()?)
                    }
                    None => Ok(Vec::new()),
                }
            };
            st.exp_avg = get("exp_avg")?;
            st.exp_avg_sq = get("exp_avg_sq")?;
            st.momentum_buffer = get("momentum_buffer")?;
        }
        Ok(())
    }
}

/// Per-step constants of AdamW, each rounded to f32 from f64 as PyTorch does.
struct AdamConsts {
    decay: f32,
    b2: f32,
    one_minus_b1: f32,
    one_minus_b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

/// Below this many parameters the update runs on the calling thread.
const PARALLEL_MIN_PARAMS: usize = 1 << 18;

struct SgdConsts {
    lr: f32,
    wd: f32,
    mom: f32,
    damp: f32,
    nesterov: bool,
    first: bool,
}

// `torch.optim.SGD` for one parameter, with the common cases as straight loops (compiled for
// wider vectors too, as `adamw_kernel`).
crate::model::vecmath::dispatch_wide!(sgd_kernel(w: &mut [f32], g: &[f32], buf: &mut [f32], c: &SgdConsts) {
    let n = w.len();
    let g = &g[..n];
    let SgdConsts {
        lr,
        wd,
        mom,
        damp,
        nesterov,
        first,
    } = *c;
    if mom == 0.0 {
        for (w, &g) in w.iter_mut().zip(g) {
            *w -= lr * (g + wd * *w);
        }
        return;
    }
    let buf = &mut buf[..n];
    for ((w, &g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
        let d = g + wd * *w;
        *b = if first {
            d
        } else {
            mom * *b + (1.0 - damp) * d
        };
        *w -= lr * if nesterov { d + mom * *b } else { *b };
    }
});

// The AdamW update of one parameter, written over zipped slices so that it vectorizes, and
// compiled for AVX-512 and AVX2 too (release builds target the baseline CPU, whose 4-lane
// square roots and divisions made this a fifth of the digits MLP's step; the results are the
// same bits in every variant: IEEE square root and division, no fused multiply-adds).
crate::model::vecmath::dispatch_wide!(adamw_kernel(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConsts) {
    let AdamConsts {
        decay,
        b2,
        one_minus_b1,
        one_minus_b2,
        eps,
        step_size,
        bc2_sqrt,
    } = *c;
    let n = w.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *w *= decay;
        *m += (g - *m) * one_minus_b1;
        *v = *v * b2 + one_minus_b2 * g * g;
        let denom = v.sqrt() / bc2_sqrt + eps;
        *w -= step_size * (*m / denom);
    }
});

/// Scales `grads` so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> f64 {
    let norm = grads.norm();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        grads.scale(coef as f32);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamStore;
    use candle_core::Var;

    fn param(v: &[f32]) -> Param {
        Param {
            name: "w".into(),
            var: Var::new(v, &Device::Cpu).unwrap(),
            trainable: true,
        }
    }

    #[test]
    fn the_wide_update_kernels_give_the_scalar_loops_bits() {
        // Odd lengths, so that the vector loops have tails; values from a fixed LCG.
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let n = 1037;
        let w0: Vec<f32> = (0..n).map(|_| next()).collect();
        let g: Vec<f32> = (0..n).map(|_| next() * 0.1).collect();
        let m0: Vec<f32> = (0..n).map(|_| next() * 0.01).collect();
        let v0: Vec<f32> = (0..n).map(|_| next().abs() * 1e-4).collect();
        let c = AdamConsts {
            decay: 0.99999,
            b2: 0.999,
            one_minus_b1: 0.1,
            one_minus_b2: 0.001,
            eps: 1e-8,
            step_size: 1e-3 / 0.271,
            bc2_sqrt: 0.0447,
        };
        let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
        adamw_kernel(&mut w, &g, &mut m, &mut v, &c);
        for i in 0..n {
            let (mut wi, mut mi, mut vi) = (w0[i], m0[i], v0[i]);
            wi *= c.decay;
            mi += (g[i] - mi) * c.one_minus_b1;
            vi = vi * c.b2 + c.one_minus_b2 * g[i] * g[i];
            let denom = std::hint::black_box(vi).sqrt() / c.bc2_sqrt + c.eps;
            wi -= c.step_size * (mi / denom);
            assert_eq!(
                (w[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                (wi.to_bits(), mi.to_bits(), vi.to_bits()),
                "AdamW at {i}"
            );
        }
        let c = SgdConsts {
            lr: 0.01,
            wd: 1e-4,
            mom: 0.9,
            damp: 0.0,
            nesterov: true,
            first: false,
        };
        let (mut w, mut b) = (w0.clone(), m0.clone());
        sgd_kernel(&mut w, &g, &mut b, &c);
        for i in 0..n {
            let d = g[i] + c.wd * w0[i];
            let bi = c.mom * m0[i] + (1.0 - c.damp) * d;
            let wi = w0[i] - c.lr * (d + c.mom * bi);
            assert_eq!(
                (w[i].to_bits(), b[i].to_bits()),
                (wi.to_bits(), bi.to_bits()),
                "SGD at {i}"
            );
        }
    }

    #[test]
    fn adamw_matches_pytorch() {
        // torch.optim.AdamW([w], lr=0.1, weight_decay=0.01), w=[1,-2], grads [0.5,0.25] then
        // [-1,2], against the update rule of torch/optim/adamw.py evaluated in f64.
        let p = [param(&[1.0, -2.0])];
        let cfg = OptimConfig::default();
        let mut opt = Optimizer::new(&OptimConfig { lr: 0.1, ..cfg }, &p);
        let mut g = Grads::zeros(&p);
        g.buf_mut(0).copy_from_slice(&[0.5, 0.25]);
        opt.step(&p, &g, 0.1).unwrap();
        let w = p[0].var.to_vec1::<f32>().unwrap();
        assert!(
            (w[0] - 0.899).abs() < 1e-5 && (w[1] - -2.098).abs() < 1e-5,
            "{w:?}"
        );
        g.buf_mut(0).copy_from_slice(&[-1.0, 2.0]);
        opt.step(&p, &g, 0.1).unwrap();
        let w2 = p[0].var.to_vec1::<f32>().unwrap();
        let (b1, b2, lr, wd, eps) = (0.9f64, 0.999f64, 0.1f64, 0.01f64, 1e-8f64);
        let mut want = [1.0f64, -2.0];
        let gs = [[0.5, 0.25], [-1.0, 2.0]];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, gr) in gs.iter().enumerate() {
            let t = t as i32 + 1;
            for j in 0..2 {
                want[j] *= 1.0 - lr * wd;
                m[j] = b1 * m[j] + (1.0 - b1) * gr[j];
                v[j] = b2 * v[j] + (1.0 - b2) * gr[j] * gr[j];
                let mh = m[j] / (1.0 - b1.powi(t));
                let vh = v[j] / (1.0 - b2.powi(t));
                want[j] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        for j in 0..2 {
            assert!((w2[j] as f64 - want[j]).abs() < 1e-5, "{w2:?} vs {want:?}");
        }
    }

    #[test]
    fn sgd_nesterov_matches_the_formula() {
        let p = [param(&[1.0])];
        let cfg = OptimConfig {
            kind: OptimKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: Some(0.1),
            ..OptimConfig::default()
        };
        let mut opt = Optimizer::new(&cfg, &p);
        let mut g = Grads::zeros(&p);
        g.buf_mut(0).copy_from_slice(&[1.0]);
        opt.step(&p, &g, 0.5).unwrap();
        // d = 1 + 0.1*1 = 1.1; buf = 1.1; d = 1.1 + 0.9*1.1 = 2.09; w = 1 - 0.5*2.09
        let w = p[0].var.to_vec1::<f32>().unwrap()[0];
        assert!((w - (1.0 - 0.5 * 2.09)).abs() < 1e-6, "{w}");
        opt.step(&p, &g, 0.5).unwrap();
        // d = 1 + 0.1*w; buf = 0.9*1.1 + d; d' = d + 0.9*buf
        let d = 1.0 + 0.1 * w;
        let buf = 0.9 * 1.1 + d;
        let want = w - 0.5 * (d + 0.9 * buf);
        let w2 = p[0].var.to_vec1::<f32>().unwrap()[0];
        assert!((w2 - want).abs() < 1e-6, "{w2} vs {want}");
    }

    #[test]
    fn state_round_trips() {
        let store = ParamStore::new(1);
        let vb = store.var_builder();
        vb.get_with_hints(3, "a", candle_nn::Init::Const(1.0))
            .unwrap();
        let p = store.trainable();
        let mut opt = Optimizer::new(&OptimConfig::default(), &p);
        let mut g = Grads::zeros(&p);
        g.buf_mut(0).copy_from_slice(&[0.1, 0.2, 0.3]);
        opt.step(&p, &g, 0.01).unwrap();
        let saved: BTreeMap<String, Tensor> = opt.state_tensors(&p).unwrap().into_iter().collect();
        let mut opt2 = Optimizer::new(&OptimConfig::default(), &p);
        opt2.load_state(&p, &saved).unwrap();
        assert_eq!(opt2.steps(), 1);
        assert_eq!(opt2.state[0].exp_avg, opt.state[0].exp_avg);
        assert_eq!(opt2.state[0].exp_avg_sq, opt.state[0].exp_avg_sq);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let p = [param(&[0.0, 0.0])];
        let mut g = Grads::zeros(&p);
        g.buf_mut(0).copy_from_slice(&[3.0, 4.0]);
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        assert!((g.norm() - 1.0).abs() < 1e-5);
    }
}
