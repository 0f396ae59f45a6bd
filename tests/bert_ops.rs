//! wick's BERT ops (linear, layer norm, fused attention, GELU) against the same computation
//! in candle's own ops: forward values, and gradients through candle's autograd, on random
//! shapes (including padding and odd sizes), and independence from the thread count.

use candle_core::{DType, Device, Tensor, Var, D};
use wick::model::attention::{attention, AttentionSpec};
use wick::model::layer_norm::layer_norm;
use wick::model::linear::linear;
use wick::rng::Rng;

fn rand(r: &mut Rng, dims: &[usize]) -> Var {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
    Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap()
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

/// Forward and the gradients of `Σ out·weights` for `ours` and `reference` over `inputs`.
fn check(
    what: &str,
    inputs: &[&Var],
    ours: &dyn Fn() -> Tensor,
    reference: &dyn Fn() -> Tensor,
    tol: f32,
) {
    let (a, b) = (ours(), reference());
    let e = rel_err(&a, &b);
    assert!(e < tol, "{what}: forward error {e}");
    let mut r = Rng::new(99);
    let w = rand(&mut r, a.dims()).as_tensor().detach();
    let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (x, y) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
        let (x, y) = (x.expect("our gradient"), y.expect("reference gradient"));
        let e = rel_err(x, y);
        assert!(e < tol, "{what}: gradient of input {i} error {e}");
    }
}

#[test]
fn linear_matches_candle() {
    let mut r = Rng::new(1);
    for &(lead, k, n) in &[
        (&[3usize][..], 5usize, 7usize),
        (&[2, 9], 33, 17),
        (&[1, 128], 384, 1152),
        (&[700], 64, 130),
    ] {
        let mut xd = lead.to_vec();
        xd.push(k);
        let x = rand(&mut r, &xd);
        let w = rand(&mut r, &[n, k]);
        let b = rand(&mut r, &[n]);
        check(
            &format!("linear {xd:?}→{n}"),
            &[&x, &w, &b],
            &|| linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap(),
            &|| {
                x.as_tensor()
                    .broadcast_matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap()
            },
            1e-4,
        );
    }
}

#[test]
fn layer_norm_matches_candle() {
    let mut r = Rng::new(2);
    for dims in [&[4usize, 7][..], &[2, 37, 384], &[65, 16]] {
        let x = rand(&mut r, dims);
        let h = *dims.last().unwrap();
        let g = rand(&mut r, &[h]);
        let b = rand(&mut r, &[h]);
        check(
            &format!("layer_norm {dims:?}"),
            &[&x, &g, &b],
            &|| layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12).unwrap(),
            &|| {
                candle_nn::ops::layer_norm_slow(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12)
                    .unwrap()
            },
            1e-4,
        );
    }
}

#[test]
fn gelu_matches_candle() {
    let mut r = Rng::new(3);
    let x = rand(&mut r, &[3, 1000]);
    check(
        "gelu",
        &[&x],
        &|| wick::model::act::gelu(x.as_tensor()).unwrap(),
        &|| x.as_tensor().gelu_erf().unwrap(),
        1e-5,
    );
}

/// Multi-head attention in candle ops: split heads, scores, masked softmax, weighted values.
fn reference_attention(qkv: &Tensor, mask: &Tensor, heads: usize) -> Tensor {
    let (n, l, h3) = qkv.dims3().unwrap();
    let h = h3 / 3;
    let d = h / heads;
    let part = |i: usize| {
        qkv.narrow(2, i * h, h)
            .unwrap()
            .reshape((n, l, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    // Additive mask: 0 for tokens, -1e9 for padding.
    let add = ((mask.to_dtype(DType::F32).unwrap() - 1.0).unwrap() * 1e9)
        .unwrap()
        .reshape((n, 1, 1, l))
        .unwrap();
    let s = s.broadcast_add(&add).unwrap();
    let m = s.max_keepdim(D::Minus1).unwrap();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((n, l, h))
        .unwrap()
}

fn mask_for(lens: &[usize], l: usize) -> Tensor {
    let m: Vec<f32> = lens
        .iter()
        .flat_map(|&k| (0..l).map(move |j| if j < k { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (lens.len(), l), &Device::Cpu).unwrap()
}

#[test]
fn fused_attention_matches_candle_with_padding() {
    let mut r = Rng::new(4);
    for &(lens, l, heads, d) in &[
        (&[5usize, 3][..], 5usize, 2usize, 4usize),
        (&[17, 9, 1], 17, 3, 8),
        (&[40, 40], 40, 12, 32),
    ] {
        let qkv = rand(&mut r, &[lens.len(), l, 3 * heads * d]);
        let mask = mask_for(lens, l);
        let spec = AttentionSpec {
            heads,
            dropout: 0.0,
            seed: 0,
        };
        check(
            &format!("attention lens {lens:?} heads {heads} d {d}"),
            &[&qkv],
            &|| attention(qkv.as_tensor(), &mask, spec).unwrap(),
            &|| reference_attention(qkv.as_tensor(), &mask, heads),
            1e-4,
        );
    }
}

#[test]
fn attention_dropout_is_seeded_and_its_gradient_matches_finite_differences() {
    let mut r = Rng::new(5);
    let qkv = rand(&mut r, &[2, 6, 3 * 2 * 4]);
    let mask = mask_for(&[6, 4], 6);
    let spec = AttentionSpec {
        heads: 2,
        dropout: 0.3,
        seed: 11,
    };
    let f = |t: &Tensor| attention(t, &mask, spec).unwrap();
    let a = f(qkv.as_tensor());
    assert_eq!(vals(&a), vals(&f(qkv.as_tensor())), "same seed, same mask");
    let other = attention(qkv.as_tensor(), &mask, AttentionSpec { seed: 12, ..spec }).unwrap();
    assert_ne!(vals(&a), vals(&other), "another seed, another mask");
    // Gradient of Σ out·w by central differences on a few inputs.
    let w = rand(&mut r, a.dims()).as_tensor().detach();
    let loss = |t: &Tensor| -> f64 {
        (f(t) * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let g = loss_grad(&qkv, &w, &f);
    let base = vals(qkv.as_tensor());
    for idx in [0usize, 5, 17, 40, 77, 100, 143] {
        let eps = 1e-2f32;
        let mut plus = base.clone();
        plus[idx] += eps;
        let mut minus = base.clone();
        minus[idx] -= eps;
        let t = |v: Vec<f32>| Tensor::from_vec(v, qkv.dims(), &Device::Cpu).unwrap();
        let num = (loss(&t(plus)) - loss(&t(minus))) / (2.0 * eps as f64);
        assert!(
            (num - g[idx] as f64).abs() < 2e-2 * (1.0 + num.abs()),
            "index {idx}: {num} vs {}",
            g[idx]
        );
    }
}

fn loss_grad(x: &Var, w: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) -> Vec<f32> {
    let l = (f(x.as_tensor()) * w).unwrap().sum_all().unwrap();
    vals(l.backward().unwrap().get(x.as_tensor()).unwrap())
}

#[test]
fn ops_give_identical_results_for_any_thread_count() {
    let mut r = Rng::new(6);
    let x = rand(&mut r, &[3, 50, 96]);
    let w = rand(&mut r, &[288, 96]);
    let b = rand(&mut r, &[288]);
    let g = rand(&mut r, &[96]);
    let mask = mask_for(&[50, 20, 33], 50);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let qkv = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let a = attention(
                &qkv,
                &mask,
                AttentionSpec {
                    heads: 4,
                    dropout: 0.1,
                    seed: 3,
                },
            )
            .unwrap();
            let y = layer_norm(
                &a,
                g.as_tensor(),
                &b.as_tensor().narrow(0, 0, 96).unwrap(),
                1e-12,
            )
            .unwrap();
            let y = wick::model::act::gelu(&y).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            let mut out = vals(&y);
            for v in [&x, &w, &b, &g] {
                out.extend(vals(grads.get(v.as_tensor()).unwrap()));
            }
            out
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}
