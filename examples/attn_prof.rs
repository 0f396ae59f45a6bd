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
    let t = std::time::Instant::now();
    let reps = 3000 / n;
    for _ in 0..reps {
        attention(&qkv, &mask, spec).unwrap();
    }
    println!("{:.2} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
}
