//! Times the fused attention op on MiniLM's shapes (`[n, 128, 3·384]`, 12 heads), with wick's
//! AVX-512 path and with the general product, alternating: `attn_prof [n]`.
use candle_core::{Device, Tensor};
use wick::model::attention::{attention, AttentionSpec};
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    wick::alloc::keep_freed_memory();
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(32);
    let qkv = Tensor::randn(0f32, 1., (n, 128, 1152), &Device::Cpu).unwrap();
    let mask = Tensor::ones((n, 128), candle_core::DType::F32, &Device::Cpu).unwrap();
    let spec = AttentionSpec {
        heads: 12,
        dropout: 0.0,
        seed: 0,
    };
    let reps = (300 / n).max(1);
    let mut best = [f64::MAX; 2];
    for _ in 0..20 {
        for (i, on) in [true, false].into_iter().enumerate() {
            wick::model::packed_linear::set_enabled(on);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(attention(&qkv, &mask, spec).unwrap());
            }
            best[i] = best[i].min(t.elapsed().as_secs_f64() / reps as f64);
        }
    }
    let outs: Vec<Tensor> = [true, false]
        .map(|on| {
            wick::model::packed_linear::set_enabled(on);
            attention(&qkv, &mask, spec).unwrap()
        })
        .into();
    let diff = (&outs[0] - &outs[1])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!(
        "n={n}: AVX-512 path {:.2} ms, general {:.2} ms (best of 20); max |diff| {diff}",
        best[0] * 1e3,
        best[1] * 1e3
    );
}
