//! Throughput of the int8 GEMM against the f32 GEMM on MiniLM's shapes (one thread), and of
//! wick's int8 linear layer against candle's Q8_0 `QMatMul` at few rows:
//! `cargo run --release --example int8_gemm`.

use std::time::Instant;
use wick::quant::gemm;

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .unwrap();
    let mut r = wick::rng::Rng::new(1);
    for (m, n, k) in [(4096, 1536, 384), (4096, 384, 1536), (128, 1152, 384)] {
        let x: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
        let q = wick::quant::QTensor::quantize("w", wick::quant::LayerKind::Linear, &w, &[n, k]);
        let p = q.packed();
        let a = gemm::quantize_rows(&x, m, k, None);
        let ai8: Vec<i8> = (0..m * k).map(|i| (i % 200) as i8).collect();
        let mut out = vec![0f32; m * n];
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            wick::model::kernels::gemm_tiled(m, n, k, &mut out, n, false, &x, k, 1, &w, 1, k);
        }
        let f = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(gemm::gemm_i32(&ai8, m, p));
        }
        let i = t.elapsed().as_secs_f64() / reps as f64;
        // Every kernel this CPU runs, on the same product.
        let per_isa: Vec<String> = gemm::Isa::available()
            .into_iter()
            .filter(|&isa| isa != gemm::Isa::Portable)
            .map(|isa| {
                let p = gemm::pack_for(&q.q, n, k, isa);
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(gemm::gemm_i32_with(&ai8, m, &p, isa));
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                let g = 2.0 * (m * n * k) as f64 / 1e9;
                format!("{isa:?} {:.1}", g / s)
            })
            .collect();
        println!(
            "{m}x{n}x{k}: int8 i32 GOP/s by kernel: {}",
            per_isa.join(", ")
        );
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(gemm::quantize_rows(&x, m, k, None));
        }
        let qz = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(gemm::gemm_f32(&a, p, &q.scale, None));
        }
        let e = t.elapsed().as_secs_f64() / reps as f64;
        let g = 2.0 * (m * n * k) as f64 / 1e9;
        println!(
            "{m}x{n}x{k}: f32 {:.1} GFLOP/s, int8 i32 {:.1} GOP/s, quantize {:.2} ms, int8 f32-out {:.1} GOP/s",
            g / f, g / i, qz * 1e3, g / e
        );
    }
    // A linear layer of MiniLM's feed-forward (384 → 1536) on 1, 8 and 128 rows: wick's int8
    // layer (quantize rows + GEMM + epilogue) against candle's Q8_0 QMatMul.
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor as CQ};
    use candle_core::{Device, Module, Tensor};
    let (n, k) = (1536, 384);
    let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let cq = QMatMul::from_qtensor(CQ::quantize(&wt, GgmlDType::Q8_0).unwrap()).unwrap();
    let q = wick::quant::QTensor::quantize("w", wick::quant::LayerKind::Linear, &w, &[n, k]);
    for m in [1usize, 8, 128] {
        let x: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
        let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let reps = if m == 1 { 2000 } else { 200 };
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(wick::quant::linear(&xt, &q, None).unwrap());
        }
        let ours = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(cq.forward(&xt).unwrap());
        }
        let theirs = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "linear {k}->{n}, {m} rows: wick int8 {:.1} us, candle Q8_0 QMatMul {:.1} us",
            ours * 1e6,
            theirs * 1e6
        );
    }
}
