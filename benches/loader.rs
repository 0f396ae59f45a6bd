//! Loader throughput: shuffled batches of 256 × 784 f32 gathered from memory-mapped shards
//! (65,536 samples, 205 MB, in 64 MiB shards under `target/loader-bench/shards`), reported as
//! samples/s and bytes/s. `benches/compare/loader.py` measures PyTorch's DataLoader and a raw
//! numpy gather on the same data; `benches/compare/run_loader.sh` runs both.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wick::data::shard::Stats;
use wick::data::{BatchPlan, ShardSet, ShardSource, Source};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const N: usize = 65_536;
const DIM: usize = 784;
const BATCH: usize = 256;

fn loader(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/loader-bench/shards");
    wick::data::synthetic::ensure(&dir, N, DIM, 10, 64 << 20).unwrap();
    let device = candle_core::Device::Cpu;
    let mut g = c.benchmark_group("loader");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(50);
    let norm = Stats {
        mean: vec![0.5],
        std: vec![0.25],
    };
    for (name, stats) in [("raw_f32", None), ("standardized", Some(&norm))] {
        let src =
            ShardSource::new(ShardSet::open(&dir, false).unwrap(), "x", "label", stats).unwrap();
        let mut epoch = 0u64;
        let mut plan = BatchPlan::shuffled(N, BATCH, true, 0, epoch);
        let mut i = 0;
        g.bench_function(format!("shuffled_256x784_{name}"), |b| {
            b.iter(|| {
                if i == plan.len() {
                    epoch += 1;
                    plan = BatchPlan::shuffled(N, BATCH, true, 0, epoch);
                    i = 0;
                }
                let batch = src.gather(plan.indices(i), &device).unwrap();
                i += 1;
                batch
            })
        });
    }
    g.finish();
}

criterion_group!(benches, loader);
criterion_main!(benches);
