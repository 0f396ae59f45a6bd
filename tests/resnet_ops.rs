//! wick's convolution, batch-norm and max-pool ops against candle's own ops (forward, and
//! gradients through candle's autograd) on random shapes.

use candle_core::{Device, Tensor, Var};
use wick::model::batchnorm::BatchNorm2d;
use wick::model::conv::{conv2d, ConvSpec};
use wick::model::pool::{max_pool2d, PoolSpec};
use wick::rng::Rng;

fn rand(r: &mut Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| / max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (vals(a), vals(b));
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn nchw(x: &Tensor) -> Tensor {
    x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()
}

#[test]
fn conv2d_matches_candle_forward_and_gradients() {
    let mut r = Rng::new(7);
    // (n, h, w, cin, cout, k, stride, padding, dilation, groups)
    let cases = [
        (2, 9, 7, 3, 5, 3, 1, 1, 1, 1),
        (3, 8, 8, 4, 6, 3, 2, 1, 1, 1),
        (1, 11, 10, 6, 4, 3, 1, 2, 2, 1),
        (2, 7, 9, 4, 6, 3, 1, 1, 1, 2),
        (2, 12, 12, 3, 8, 7, 2, 3, 1, 1),
        (4, 5, 5, 8, 16, 1, 1, 0, 1, 1),
        (2, 9, 9, 8, 4, 1, 2, 0, 1, 1),
        (1, 13, 6, 6, 6, 5, 3, 2, 1, 3),
        (2, 10, 10, 4, 4, 3, 2, 0, 2, 4),
        // Few output pixels for many channels: im2col columns ordered (channel, ki, kj).
        (1, 4, 4, 8, 32, 3, 1, 1, 1, 1),
        (2, 3, 3, 16, 64, 3, 2, 1, 1, 1),
        // Output channels a multiple of 32: the direct kernel where the CPU has AVX-512, and
        // its input gradient (stride 1, at least 1,024 output pixels, 32·k input channels).
        (4, 16, 16, 32, 32, 3, 1, 1, 1, 1),
        (1, 34, 33, 32, 64, 3, 1, 2, 2, 1),
        (2, 9, 9, 5, 32, 3, 2, 1, 1, 1),
        (1, 5, 5, 8, 96, 1, 2, 0, 1, 1),
    ];
    for &(n, h, w, cin, cout, k, stride, padding, dilation, groups) in &cases {
        let spec = ConvSpec {
            stride,
            padding,
            dilation,
            groups,
        };
        let label = format!(
            "{spec:?} x[{n},{h},{w},{cin}] w[{cout},{},{k},{k}]",
            cin / groups
        );
        let x = Var::from_tensor(&rand(&mut r, &[n, h, w, cin])).unwrap();
        let wt = Var::from_tensor(&rand(&mut r, &[cout, cin / groups, k, k])).unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), spec).unwrap();
        let theirs = nchw(x.as_tensor())
            .conv2d(wt.as_tensor(), padding, stride, dilation, groups)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        assert!(rel_err(&ours, &theirs) < 1e-4, "forward {label}");
        // A random linear functional of the output, so every output element matters.
        let probe = rand(&mut r, ours.dims());
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // candle's conv backward mis-sizes the input gradient when the two axes need different
        // output paddings; there, the reference is a finite difference in f64, which is exact
        // for this linear functional.
        let reference = match (&theirs * &probe).unwrap().sum_all().unwrap().backward() {
            Ok(g2) => [x.as_tensor(), wt.as_tensor()].map(|v| g2.get(v).unwrap().clone()),
            Err(_) => finite_difference(x.as_tensor(), wt.as_tensor(), &probe, spec),
        };
        for ((v, what), want) in [(&x, "input"), (&wt, "weight")].into_iter().zip(&reference) {
            let a = g1.get(v.as_tensor()).unwrap();
            let e = rel_err(a, want);
            assert!(e < 1e-4, "{what} gradient {label}: rel err {e}");
        }
    }
}

/// Gradients of `Σ conv(x, w) · probe` by unit finite differences through candle's f64
/// convolution.
fn finite_difference(x: &Tensor, w: &Tensor, probe: &Tensor, s: ConvSpec) -> [Tensor; 2] {
    let f64_of = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    let (x, w, probe) = (f64_of(x), f64_of(w), f64_of(probe));
    let loss = |x: &Tensor, w: &Tensor| -> f64 {
        let y = nchw(x)
            .conv2d(w, s.padding, s.stride, s.dilation, s.groups)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        (y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let base = loss(&x, &w);
    let grad = |t: &Tensor, which: usize| -> Tensor {
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f32> = (0..v.len())
            .map(|i| {
                let mut v2 = v.clone();
                v2[i] += 1.0;
                let t2 = Tensor::from_vec(v2, t.shape(), &Device::Cpu).unwrap();
                let l = if which == 0 {
                    loss(&t2, &w)
                } else {
                    loss(&x, &t2)
                };
                (l - base) as f32
            })
            .collect();
        Tensor::from_vec(g, t.shape(), &Device::Cpu).unwrap()
    };
    [grad(&x, 0), grad(&w, 1)]
}

#[test]
fn conv2d_is_identical_for_any_thread_count() {
    let mut r = Rng::new(3);
    let x = rand(&mut r, &[8, 16, 16, 32]);
    let w = Var::from_tensor(&rand(&mut r, &[64, 32, 3, 3])).unwrap();
    let spec = ConvSpec {
        padding: 1,
        ..Default::default()
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = conv2d(xv.as_tensor(), w.as_tensor(), spec).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (
                vals(&y),
                vals(g.get(xv.as_tensor()).unwrap()),
                vals(g.get(w.as_tensor()).unwrap()),
            )
        })
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(1), run(3));
}

/// Batch norm written with candle ops (training mode: batch statistics).
fn candle_bn(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
    let c = g.elem_count();
    let flat = x.reshape(((), c)).unwrap();
    let mean = flat.mean_keepdim(0).unwrap();
    let d = flat.broadcast_sub(&mean).unwrap();
    let var = d.sqr().unwrap().mean_keepdim(0).unwrap();
    d.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&g.reshape((1, c)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((1, c)).unwrap())
        .unwrap()
        .reshape(x.shape())
        .unwrap()
}

#[test]
fn batch_norm_matches_candle_and_tracks_running_statistics() {
    let mut r = Rng::new(11);
    for &(n, h, w, c) in &[(4, 5, 5, 3), (2, 17, 9, 8), (16, 4, 4, 64)] {
        let x = Var::from_tensor(&rand(&mut r, &[n, h, w, c]).affine(3.0, 1.5).unwrap()).unwrap();
        let g = Var::from_tensor(&rand(&mut r, &[c])).unwrap();
        let b = Var::from_tensor(&rand(&mut r, &[c])).unwrap();
        let bn = BatchNorm2d {
            weight: g.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            running_mean: Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
            running_var: Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
            num_batches_tracked: Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap(),
            eps: 1e-5,
            momentum: 0.1,
        };
        let ours = bn.forward(x.as_tensor(), true).unwrap();
        let theirs = candle_bn(x.as_tensor(), g.as_tensor(), b.as_tensor());
        assert!(rel_err(&ours, &theirs) < 1e-4, "forward");
        let probe = rand(&mut r, ours.dims());
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, what) in [(&x, "input"), (&g, "weight"), (&b, "bias")] {
            let e = rel_err(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(
                e < 1e-4,
                "batch norm {what} gradient [{n},{h},{w},{c}]: {e}"
            );
        }
        // Running statistics: PyTorch's update (momentum 0.1, unbiased variance).
        let flat = x.as_tensor().reshape(((), c)).unwrap();
        let rows = (n * h * w) as f64;
        let mean = flat.mean(0).unwrap();
        let var = flat
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .sum(0)
            .unwrap()
            .affine(1.0 / (rows - 1.0), 0.0)
            .unwrap();
        let want_mean = (mean * 0.1).unwrap();
        let want_var = ((var * 0.1).unwrap() + 0.9).unwrap();
        assert!(rel_err(&bn.running_mean, &want_mean) < 1e-5);
        assert!(rel_err(&bn.running_var, &want_var) < 1e-5);
        assert_eq!(vals(&bn.num_batches_tracked.reshape(1).unwrap()), [1.0]);
        // Evaluation mode uses the running statistics.
        let ev = bn.forward(x.as_tensor(), false).unwrap();
        let want = x
            .as_tensor()
            .broadcast_sub(&bn.running_mean)
            .unwrap()
            .broadcast_div(&(bn.running_var.clone() + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(g.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(rel_err(&ev, &want) < 1e-5, "eval mode");
    }
}

#[test]
fn max_pool_matches_candle_and_routes_gradients_to_the_maximum() {
    let mut r = Rng::new(5);
    for &(n, h, w, c) in &[(2, 8, 8, 3), (3, 9, 7, 5), (1, 16, 16, 64)] {
        let x = Var::from_tensor(&rand(&mut r, &[n, h, w, c])).unwrap();
        // Unpadded: candle's forward is the reference.
        let spec = PoolSpec {
            kernel: 2,
            stride: 2,
            padding: 0,
        };
        let ours = max_pool2d(x.as_tensor(), spec).unwrap();
        let theirs = nchw(x.as_tensor())
            .max_pool2d_with_stride(2, 2)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        assert_eq!(rel_err(&ours, &theirs), 0.0);
        // ResNet's pool (3×3, stride 2, padding 1), gradient against a direct computation.
        let spec = PoolSpec {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let y = max_pool2d(x.as_tensor(), spec).unwrap();
        let probe = rand(&mut r, y.dims());
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = vals(g.get(x.as_tensor()).unwrap());
        let xv = vals(x.as_tensor());
        let (yv, pv) = (vals(&y), vals(&probe));
        let (ho, wo) = (y.dim(1).unwrap(), y.dim(2).unwrap());
        let mut want = vec![0f32; xv.len()];
        for b in 0..n {
            for oh in 0..ho {
                for ow in 0..wo {
                    for ch in 0..c {
                        let mut best = (f32::NEG_INFINITY, 0);
                        for ki in 0..3 {
                            for kj in 0..3 {
                                let (ih, iw) = (oh * 2 + ki, ow * 2 + kj);
                                if ih == 0 || iw == 0 || ih > h || iw > w {
                                    continue;
                                }
                                let at = ((b * h + ih - 1) * w + iw - 1) * c + ch;
                                if xv[at] > best.0 {
                                    best = (xv[at], at);
                                }
                            }
                        }
                        let o = ((b * ho + oh) * wo + ow) * c + ch;
                        assert_eq!(yv[o], best.0);
                        want[best.1] += pv[o];
                    }
                }
            }
        }
        assert_eq!(got, want);
    }
}

#[test]
fn fused_activations_match_candle() {
    use wick::model::act::{add_relu, relu};
    let mut r = Rng::new(9);
    let a = Var::from_tensor(&rand(&mut r, &[3, 5, 4, 6])).unwrap();
    let b = Var::from_tensor(&rand(&mut r, &[3, 5, 4, 6])).unwrap();
    let probe = rand(&mut r, &[3, 5, 4, 6]);
    let check = |ours: Tensor, theirs: Tensor, what: &str| {
        assert_eq!(rel_err(&ours, &theirs), 0.0, "{what} forward");
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&a, &b] {
            match (g1.get(v.as_tensor()), g2.get(v.as_tensor())) {
                (Some(x), Some(y)) => assert!(rel_err(x, y) < 1e-6, "{what} gradient"),
                (None, None) => {}
                _ => panic!("{what}: gradients flow to different inputs"),
            }
        }
    };
    check(
        relu(a.as_tensor()).unwrap(),
        a.as_tensor().relu().unwrap(),
        "relu",
    );
    check(
        add_relu(a.as_tensor(), b.as_tensor()).unwrap(),
        (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap(),
        "add_relu",
    );
    // Batch norm + ReLU in one pass, against batch norm then candle's ReLU.
    let g = Var::from_tensor(&rand(&mut r, &[6])).unwrap();
    let bias = rand(&mut r, &[6]);
    let bn = |c: usize| BatchNorm2d {
        weight: g.as_tensor().clone(),
        bias: bias.clone(),
        running_mean: Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
        running_var: Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
        num_batches_tracked: Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap(),
        eps: 1e-5,
        momentum: 0.1,
    };
    for train in [true, false] {
        let fused = bn(6).forward_act(a.as_tensor(), train, true).unwrap();
        let split = bn(6).forward(a.as_tensor(), train).unwrap().relu().unwrap();
        assert!(rel_err(&fused, &split) < 1e-6);
        let g1 = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (split * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Evaluation mode is for frozen layers: only the input gets a gradient.
        let vars = if train { vec![&a, &g] } else { vec![&a] };
        for v in vars {
            let e = rel_err(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "bn+relu (train {train}) gradient: {e}");
        }
    }
}
