//! ResNet-18 training-step throughput at batch 16 × 3×64×64 (random images, 10 classes, SGD
//! with momentum 0.9): the whole network trained, and the backbone frozen (the head trained on
//! the backbone's output, recomputed each step, as PyTorch does). Reported in images per
//! second. `benches/compare/resnet_step.py` runs the same in PyTorch;
//! `benches/compare/run_resnet.sh` runs both.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wick::config::{OptimConfig, OptimKind, ResnetArch};
use wick::data::Batch;
use wick::model::{Freeze, Grads, Loss, Model, ModelCtx, ParamStore, ResNet, ResNetConfig};
use wick::rng::Rng;
use wick::train::optim::Optimizer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 16;
const SIDE: usize = 64;

fn bench(c: &mut Criterion, name: &str, freeze: Freeze) {
    wick::alloc::keep_freed_memory();
    let dev = candle_core::Device::Cpu;
    let net = ResNet::new(
        ParamStore::new(0),
        ResNetConfig {
            arch: ResnetArch::Resnet18,
            width: 64,
            num_classes: 10,
            in_channels: 3,
            input_shape: [3, SIDE, SIDE],
            head_hidden: None,
            dropout: 0.0,
            freeze,
            stages: 4,
        },
    )
    .unwrap();
    let mut r = Rng::new(1);
    let d = 3 * SIDE * SIDE;
    let x: Vec<f32> = (0..BATCH * d).map(|_| r.normal() as f32).collect();
    let y: Vec<u32> = (0..BATCH).map(|i| (i % 10) as u32).collect();
    let batch = Batch {
        x: candle_core::Tensor::from_vec(x, (BATCH, d), &dev).unwrap(),
        y: candle_core::Tensor::from_vec(y, BATCH, &dev).unwrap(),
        n: BATCH,
        mask: None,
    };
    let params = net.store().trainable();
    let mut grads = Grads::zeros(&params);
    let ocfg = OptimConfig {
        kind: OptimKind::Sgd,
        lr: 0.01,
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = Optimizer::new(&ocfg, &params);
    let mut step = 0u64;
    let mut g = c.benchmark_group("resnet18_train_step");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10);
    g.bench_function(name, |b| {
        b.iter(|| {
            let mut ctx = ModelCtx::train(0, step);
            net.loss_and_grad(
                &batch,
                Loss::CrossEntropy,
                &mut ctx,
                &params,
                &mut grads,
                1.0,
            )
            .unwrap();
            opt.step(&params, &grads, 0.01).unwrap();
            grads.zero();
            step += 1;
        })
    });
    g.finish();
}

fn resnet(c: &mut Criterion) {
    bench(c, "b16_64x64_full", Freeze::None);
    bench(c, "b16_64x64_frozen_backbone", Freeze::Backbone);
}

criterion_group!(benches, resnet);
criterion_main!(benches);
