//! The int8 kernels: the GEMM against a scalar reference (exact, on odd shapes, every
//! instruction set this CPU runs, any thread count), and the int8 layers against f32.

use candle_core::{Device, Tensor};
use wick::model::conv::{conv2d_forward, ConvSpec};
use wick::quant::gemm::{self, Isa};
use wick::quant::{rel_error, LayerKind, QTensor};
use wick::rng::Rng;

fn i8s(r: &mut Rng, n: usize) -> Vec<i8> {
    // The full i8 range, -128 included, though quantization only produces [-127, 127].
    (0..n).map(|_| (r.below(256) as i32 - 128) as i8).collect()
}

fn f32s(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.normal() as f32).collect()
}

#[test]
fn int8_gemm_matches_the_scalar_reference_exactly_on_odd_shapes() {
    let mut r = Rng::new(11);
    let mut shapes = vec![
        (1, 1, 1),
        (1, 16, 2),
        (6, 16, 32),
        (7, 17, 33),
        (5, 3, 1),
        (13, 47, 129),
        (64, 384, 384),
        (97, 100, 31),
        (2, 1536, 384),
        (300, 40, 9),
    ];
    for _ in 0..20 {
        shapes.push((
            1 + r.below(70) as usize,
            1 + r.below(90) as usize,
            1 + r.below(300) as usize,
        ));
    }
    for (m, n, k) in shapes {
        let a = i8s(&mut r, m * k);
        let b = i8s(&mut r, n * k);
        let want = gemm::reference(&a, &b, m, n, k);
        let packed = gemm::pack(&b, n, k);
        for isa in Isa::available() {
            let got = gemm::gemm_i32_with(&a, m, &packed, isa);
            assert_eq!(
                got, want,
                "{isa:?} differs from the reference at m={m} n={n} k={k}"
            );
        }
    }
    // Extremes: every product at its largest magnitude, over a long k.
    let (m, n, k) = (7, 19, 4099);
    let a = vec![-128i8; m * k];
    let b = vec![-128i8; n * k];
    let got = gemm::gemm_i32_with(&a, m, &gemm::pack(&b, n, k), Isa::detect());
    assert!(got.iter().all(|&v| v == 128 * 128 * k as i32));
}

#[test]
fn the_amx_kernel_runs_where_the_cpu_has_amx() {
    // On Linux the kernel lists the CPU's AMX in /proc/cpuinfo once it can grant the tile
    // state; the exactness test above then covers the AMX kernel. A failed permission request
    // would silently fall back to the VNNI kernel, and this catches that.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if has("amx_tile") && has("amx_int8") {
        assert!(
            Isa::available().contains(&Isa::Amx),
            "the CPU has AMX but the int8 GEMM does not use it"
        );
        assert_eq!(Isa::detect(), Isa::Amx);
    }
}

#[test]
fn int8_gemm_is_the_same_for_any_thread_count() {
    let mut r = Rng::new(5);
    let (m, n, k) = (211, 130, 77);
    let a = i8s(&mut r, m * k);
    let b = gemm::pack(&i8s(&mut r, n * k), n, k);
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| gemm::gemm_i32(&a, m, &b))
    };
    let one = run(1);
    assert_eq!(run(2), one);
    assert_eq!(run(3), one);
}

#[test]
fn quantized_rows_round_to_nearest_and_keep_the_scale() {
    let x = vec![0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 3.0, 1.5, -0.01];
    let q = gemm::quantize_rows(&x, 3, 3, None);
    assert_eq!(q.scale, vec![1.0 / 127.0, 0.0, 3.0 / 127.0]);
    // Rows are padded to an even width (4).
    assert_eq!(&q.q[0..4], &[64, -127, 32, 0]);
    assert_eq!(&q.q[4..8], &[0, 0, 0, 0]);
    assert_eq!(&q.q[8..12], &[127, 64, 0, 0]);
    // Static mode clips to the calibrated range.
    let s = gemm::quantize_rows(&[10.0, -0.5], 1, 2, Some(1.0 / 127.0));
    assert_eq!(&s.q[..2], &[127, -64]);
}

#[test]
fn int8_linear_stays_close_to_f32() {
    let mut r = Rng::new(3);
    let (m, n, k) = (50, 33, 70);
    let x = f32s(&mut r, m * k);
    let w = f32s(&mut r, n * k);
    let bias = f32s(&mut r, n);
    let q = QTensor::quantize("w", LayerKind::Linear, &w, &[n, k]);
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let bt = Tensor::from_vec(bias.clone(), n, &Device::Cpu).unwrap();
    let got: Vec<f32> = wick::quant::linear(&xt, &q, Some(&bt))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut want = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = bias[j] + (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f32>();
        }
    }
    let e = rel_error(&want, &got);
    assert!(e < 0.02, "int8 linear error {e}");
    assert!(e > 0.0, "int8 linear is suspiciously exact");
    // The dequantized weights are within half a step of the originals.
    let dq = q.dequantize();
    for (row, (a, b)) in w.chunks(k).zip(dq.chunks(k)).enumerate() {
        let step = q.scale[row];
        assert!(a
            .iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 0.5 * step + 1e-7));
    }
}

#[test]
fn int8_conv_matches_f32_conv_on_odd_shapes() {
    let mut r = Rng::new(9);
    for (n, h, w, c, o, kk, stride, pad) in [
        (2, 9, 7, 3, 5, 3, 1, 1),
        (1, 13, 6, 4, 8, 5, 3, 2),
        (3, 8, 8, 16, 17, 1, 1, 0),
        (2, 11, 11, 6, 4, 1, 2, 0),
        (1, 28, 28, 1, 8, 7, 2, 3),
    ] {
        let spec = ConvSpec {
            stride,
            padding: pad,
            ..Default::default()
        };
        let x = f32s(&mut r, n * h * w * c);
        let wt = f32s(&mut r, o * c * kk * kk);
        let ws = [o, c, kk, kk];
        let (want, shape) = conv2d_forward(&x, &[n, h, w, c], &wt, &ws, spec).unwrap();
        let q = QTensor::quantize("conv", LayerKind::Conv2d, &wt, &ws);
        let xt = Tensor::from_vec(x, (n, h, w, c), &Device::Cpu).unwrap();
        let got = wick::quant::conv2d(&xt, &q, spec, None, false).unwrap();
        assert_eq!(got.dims(), &shape);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let e = rel_error(&want, &got);
        assert!(
            e < 0.02,
            "int8 conv error {e} for {:?}",
            (n, h, w, c, o, kk, stride, pad)
        );
    }
}

#[test]
fn stacked_int8_weights_equal_their_parts() {
    let mut r = Rng::new(1);
    let parts: Vec<QTensor> = (0..3)
        .map(|i| {
            QTensor::quantize(
                &format!("p{i}"),
                LayerKind::Linear,
                &f32s(&mut r, 4 * 6),
                &[4, 6],
            )
        })
        .collect();
    let s = QTensor::stack("qkv", &[&parts[0], &parts[1], &parts[2]]);
    assert_eq!(s.shape, vec![12, 6]);
    let whole = s.dequantize();
    let each: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
    assert_eq!(whole, each);
}

#[test]
fn skip_patterns_match_names_prefixes_and_wildcards() {
    use wick::quant::skip_matches;
    assert!(skip_matches("classifier.weight", "classifier.weight"));
    assert!(skip_matches("classifier", "classifier.weight"));
    assert!(skip_matches(
        "encoder.layer.0.",
        "encoder.layer.0.output.dense.weight"
    ));
    assert!(!skip_matches(
        "encoder.layer.1",
        "encoder.layer.10.output.dense.weight"
    ));
    assert!(skip_matches(
        "*.output.dense.*",
        "encoder.layer.3.output.dense.weight"
    ));
    assert!(skip_matches(
        "*embeddings*",
        "embeddings.word_embeddings.weight"
    ));
    assert!(!skip_matches("*.pooler.*", "classifier.weight"));
}

#[test]
fn fused_int8_layers_give_the_bits_of_their_separate_steps() {
    let mut r = Rng::new(17);
    let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    // (rows, in, hidden, out): few rows (a task holds only some of a row's columns), then
    // enough rows for whole-row tasks, odd widths, partial tiles and MiniLM's widths.
    for (m, k, hid, n) in [
        (5, 7, 33, 9),
        (70, 31, 50, 17),
        (200, 70, 100, 37),
        (130, 384, 1536, 384),
    ] {
        for fixed in [None, Some(0.05f32)] {
            let x = t(f32s(&mut r, m * k), &[m, k]);
            let res = t(f32s(&mut r, m * n), &[m, n]);
            let (b1, b2) = (t(f32s(&mut r, hid), &[hid]), t(f32s(&mut r, n), &[n]));
            let mut q1 =
                QTensor::quantize("w1", LayerKind::Linear, &f32s(&mut r, hid * k), &[hid, k]);
            let mut q2 =
                QTensor::quantize("w2", LayerKind::Linear, &f32s(&mut r, n * hid), &[n, hid]);
            q1.act_scale = fixed;
            q2.act_scale = fixed.map(|s| 3.0 * s);
            let gelu = wick::quant::Act::Gelu;
            let h = wick::quant::linear_act(&x, &q1, Some(&b1), gelu).unwrap();
            let want = (wick::quant::linear(&h, &q2, Some(&b2)).unwrap() + &res).unwrap();
            let got =
                wick::quant::mlp(&x, &q1, Some(&b1), gelu, &q2, Some(&b2), Some(&res)).unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "mlp at {m}×{k}→{hid}→{n}, {fixed:?}"
            );
            let want = (wick::quant::linear(&h, &q2, None).unwrap() + &res).unwrap();
            let got = wick::quant::linear_fused(&h, &q2, None, wick::quant::Act::None, Some(&res))
                .unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "residual at {m}×{hid}→{n}, {fixed:?}"
            );
        }
    }
    // The residual, a layer norm and the next layer's int8 rows in the product's pass.
    for (m, k, n, next_n) in [(5, 7, 9, 4), (200, 70, 37, 20), (130, 384, 384, 1152)] {
        for fixed in [None, Some(0.02f32)] {
            let x = t(f32s(&mut r, m * k), &[m, k]);
            let res = t(f32s(&mut r, m * n), &[m, n]);
            let b = t(f32s(&mut r, n), &[n]);
            let (w_ln, b_ln) = (t(f32s(&mut r, n), &[n]), t(f32s(&mut r, n), &[n]));
            let q = QTensor::quantize("w", LayerKind::Linear, &f32s(&mut r, n * k), &[n, k]);
            let mut next = QTensor::quantize(
                "next",
                LayerKind::Linear,
                &f32s(&mut r, next_n * n),
                &[next_n, n],
            );
            next.act_scale = fixed;
            let y = (wick::quant::linear(&x, &q, Some(&b)).unwrap() + &res).unwrap();
            let want = wick::model::layer_norm::layer_norm(&y, &w_ln, &b_ln, 1e-12).unwrap();
            let want_next = wick::quant::linear(&want, &next, None).unwrap();
            let after = wick::quant::After {
                residual: Some(&res),
                norm: Some((&w_ln, &b_ln, 1e-12)),
                quantize_for: Some(&next),
                ..Default::default()
            };
            let (got, rows) = wick::quant::linear_with(&x, None, &q, Some(&b), after).unwrap();
            assert_eq!(bits(&got), bits(&want), "norm at {m}×{k}→{n}, {fixed:?}");
            let rows = rows.expect("int8 rows for the next layer");
            let v: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let direct = gemm::quantize_rows(&v, m, n, fixed);
            assert_eq!((&rows.q, &rows.scale), (&direct.q, &direct.scale));
            let none = wick::quant::After::default();
            let got_next = wick::quant::linear_with(&got, Some(rows), &next, None, none)
                .unwrap()
                .0;
            assert_eq!(
                bits(&got_next),
                bits(&want_next),
                "next at {m}×{n}→{next_n}"
            );
        }
    }
    // An activation after the second product too.
    let (m, k, hid, n) = (120, 30, 40, 24);
    let x = t(f32s(&mut r, m * k), &[m, k]);
    let res = t(f32s(&mut r, m * n), &[m, n]);
    let q1 = QTensor::quantize("w1", LayerKind::Linear, &f32s(&mut r, hid * k), &[hid, k]);
    let q2 = QTensor::quantize("w2", LayerKind::Linear, &f32s(&mut r, n * hid), &[n, hid]);
    let gelu = wick::quant::Act::Gelu;
    let h = wick::quant::linear_act(&x, &q1, None, gelu).unwrap();
    let want = (wick::quant::linear_act(&h, &q2, None, gelu).unwrap() + &res).unwrap();
    let after = wick::quant::After {
        act: gelu,
        residual: Some(&res),
        ..Default::default()
    };
    let got = wick::quant::mlp_with(&x, None, &q1, None, gelu, &q2, None, after)
        .unwrap()
        .0;
    assert_eq!(bits(&got), bits(&want), "mlp with a second activation");
    // int8 rows made for another layer's static scale are refused.
    let mut other = QTensor::quantize("other", LayerKind::Linear, &f32s(&mut r, n * k), &[n, k]);
    other.act_scale = Some(0.1);
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let rows = gemm::quantize_rows(&xv, m, k, other.act_scale);
    let none = wick::quant::After::default();
    let e = wick::quant::linear_with(&x, Some(rows), &q1, None, none)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("static scale Some(0.1)") && e.contains("quantize_for"),
        "{e}"
    );
    // A bias of the wrong length is an error, not a panic.
    let bad_bias = t(f32s(&mut r, hid + 1), &[hid + 1]);
    let e = wick::quant::linear_with(&x, None, &q1, Some(&bad_bias), none)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a bias of [41] for 40 outputs"), "{e}");
    // A residual of another shape is an error, not a panic.
    let q = QTensor::quantize("w", LayerKind::Linear, &f32s(&mut r, 6), &[2, 3]);
    let x = t(f32s(&mut r, 12), &[4, 3]);
    let bad = t(f32s(&mut r, 12), &[4, 3]);
    let e = wick::quant::linear_fused(&x, &q, None, wick::quant::Act::None, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(e.contains("residual [4, 3] for an output [4, 2]"), "{e}");
}

#[test]
fn fused_products_on_weights_packed_for_another_kernel_repack_them() {
    // Weights packed for a kernel other than this CPU's (`pack_for`) take other task sizes;
    // the fused products repack them, and give the values of the CPU's own packing.
    let mut r = Rng::new(23);
    let other = match Isa::detect() {
        Isa::Amx | Isa::Avx512Vnni => Isa::Avx2,
        _ => Isa::Amx,
    };
    // 120 rows: whole-row tasks of 32 (AMX) but panel groups with tasks of 48.
    for m in [20, 120, 300] {
        let (n, k) = (70, 50);
        let b = i8s(&mut r, n * k);
        let x = f32s(&mut r, m * k);
        let a = gemm::quantize_rows(&x, m, k, None);
        let sw: Vec<f32> = (0..n).map(|j| 0.01 + 0.001 * j as f32).collect();
        let (w, bn) = (f32s(&mut r, n), f32s(&mut r, n));
        let post = gemm::RowPost {
            norm: Some((&w, &bn, 1e-5)),
            quantize: Some(None),
        };
        let own = gemm::pack(&b, n, k);
        let foreign = gemm::pack_for(&b, n, k, other);
        let run = |p: &gemm::Packed| {
            let (y, q) = gemm::gemm_f32_rows(&a, p, &sw, None, gemm::Act::Gelu, None, post);
            let q = q.unwrap();
            let h = gemm::gemm_requantize(&a, p, &sw, None, gemm::Act::Gelu, None);
            (y, q.q, q.scale, h.q, h.scale)
        };
        assert!(run(&own) == run(&foreign), "{other:?} packing at m={m}");
    }
}
