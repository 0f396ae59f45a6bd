//! MLP training throughput on sklearn digits: the model, data and batch of
//! `configs/digits_mlp.toml` (64-256-256-10, batch 64, AdamW), one shuffled epoch per
//! iteration, reported in training samples per second. `benches/compare/mlp_train.py` runs
//! the same in PyTorch; `benches/compare/run_mlp.sh` runs both.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wick::data::BatchPlan;
use wick::model::{Grads, Loss, ModelCtx};
use wick::train::optim::Optimizer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion, name: &str, overrides: &[&str]) {
    wick::alloc::keep_freed_memory();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).unwrap();
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = wick::config::load(Path::new("configs/digits_mlp.toml"), &ov).unwrap();
    let (train, _, schema) = wick::data::load_split(&cfg.data, cfg.run.seed).unwrap();
    let model =
        wick::model::build(&cfg.model, &schema, cfg.run.seed, &candle_core::Device::Cpu).unwrap();
    let params = model.store().trainable();
    let mut grads = Grads::zeros(&params);
    let mut opt = Optimizer::new(&cfg.optim, &params);
    let bs = cfg.train.batch_size;
    let mut epoch = 0u64;
    let mut g = c.benchmark_group("mlp_train");
    g.throughput(Throughput::Elements(train.n as u64));
    g.sample_size(30);
    g.bench_function(name, |b| {
        b.iter(|| {
            let plan = BatchPlan::shuffled(train.n, bs, false, cfg.run.seed, epoch);
            for i in 0..plan.len() {
                let batch = plan.batch(&train, i, &candle_core::Device::Cpu).unwrap();
                let mut ctx = ModelCtx::train(cfg.run.seed, (epoch << 32) | i as u64);
                model
                    .loss_and_grad(
                        &batch,
                        Loss::CrossEntropy,
                        &mut ctx,
                        &params,
                        &mut grads,
                        1.0,
                    )
                    .unwrap();
                opt.step(&params, &grads, cfg.optim.lr).unwrap();
                grads.zero();
            }
            epoch += 1;
        })
    });
    g.finish();
}

fn digits(c: &mut Criterion) {
    // The built-in MLP: fused CPU kernel.
    bench(c, "digits_64-256-256-10_b64_fused", &[]);
    // The same network through candle's autograd (what a custom `Model` gets); gelu is the one
    // activation the fused kernel leaves to autograd, so this is also the candle baseline.
    bench(
        c,
        "digits_64-256-256-10_b64_autograd_gelu",
        &["model.activation=\"gelu\""],
    );
}

criterion_group!(benches, digits);
criterion_main!(benches);
