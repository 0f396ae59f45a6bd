//! Throughput of the int8 GEMM against the f32 GEMM on MiniLM's shapes (one thread):
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
}
