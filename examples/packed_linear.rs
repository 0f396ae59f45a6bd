//! f32 linear layers on MiniLM's shapes: wick's packed-weight kernel (`model::packed_linear`)
//! against the general product (`gemm_tiled`, the `gemm` crate, bias written first), best of
//! 20 calls each, alternating: `cargo run --release --example packed_linear -- [THREADS]`.

use std::time::Instant;

use wick::model::kernels::gemm_tiled;
use wick::model::packed_linear::PackedLinear;

// As the wick binary and the BERT examples: freed memory is reused, so outputs do not fault
// in fresh pages on every call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    wick::alloc::keep_freed_memory();
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let mut r = wick::rng::Rng::new(1);
    for (m, n, k) in [
        (4096, 1152, 384),
        (4096, 384, 384),
        (4096, 1536, 384),
        (4096, 384, 1536),
        (128, 1152, 384),
        (128, 1536, 384),
        (128, 384, 1536),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
        let b: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        let Some(p) = PackedLinear::new(&w, n, k, Some(&b)) else {
            println!("no AVX-512F: nothing to compare");
            return;
        };
        let general = || {
            let mut out = Vec::with_capacity(m * n);
            for _ in 0..m {
                out.extend_from_slice(&b);
            }
            gemm_tiled(m, n, k, &mut out, n, true, &x, k, 1, &w, 1, k);
            out
        };
        let (mut tg, mut tp) = (f64::MAX, f64::MAX);
        let mut diff = 0f32;
        for _ in 0..20 {
            let t = Instant::now();
            let g = std::hint::black_box(general());
            tg = tg.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let q = std::hint::black_box(p.forward(&x, m));
            tp = tp.min(t.elapsed().as_secs_f64());
            diff = g
                .iter()
                .zip(&q)
                .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
        }
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        println!(
            "{m}x{n}x{k}: gemm_tiled {:.1} GFLOP/s ({:.2} ms), packed {:.1} GFLOP/s ({:.2} ms), {:.2}x; max |diff| {diff:.2e}",
            gf / tg,
            tg * 1e3,
            gf / tp,
            tp * 1e3,
            tg / tp
        );
    }
}
