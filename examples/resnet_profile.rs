//! Runs ResNet-18 training steps (batch 16 × 3×64×64) for profiling: `perf record` this.
//! Usage: resnet_profile [full|frozen] [steps] (after 3 warm-up steps)
use wick::config::{OptimConfig, OptimKind, ResnetArch};
use wick::data::Batch;
use wick::model::{Freeze, Grads, Loss, Model, ModelCtx, ParamStore, ResNet, ResNetConfig};
use wick::train::optim::Optimizer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::var_os("NO_KEEP").is_none() {
        wick::alloc::keep_freed_memory();
    }
    let args: Vec<String> = std::env::args().collect();
    let freeze = match args.get(1).map(String::as_str) {
        Some("frozen") => Freeze::Backbone,
        _ => Freeze::None,
    };
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let dev = candle_core::Device::Cpu;
    let net = ResNet::new(
        ParamStore::new(0),
        ResNetConfig {
            arch: ResnetArch::Resnet18,
            width: 64,
            num_classes: 10,
            in_channels: 3,
            input_shape: [3, 64, 64],
            head_hidden: None,
            dropout: 0.0,
            freeze,
            stages: 4,
        },
    )
    .unwrap();
    let d = 3 * 64 * 64;
    let x: Vec<f32> = (0..16 * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let batch = Batch {
        x: candle_core::Tensor::from_vec(x, (16, d), &dev).unwrap(),
        y: candle_core::Tensor::from_vec((0..16u32).map(|i| i % 10).collect::<Vec<_>>(), 16, &dev)
            .unwrap(),
        n: 16,
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
    // Warm-up steps, as the PyTorch script does: the first steps fault in the memory that
    // later steps reuse.
    for s in 0..3 {
        let mut ctx = ModelCtx::train(0, 1000 + s);
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
    }
    let t = std::time::Instant::now();
    for s in 0..steps {
        let mut ctx = ModelCtx::train(0, s as u64);
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
    }
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    if std::env::var("SPLIT").is_ok() {
        let (mut f, mut b, mut o) = (0.0, 0.0, 0.0);
        for s in 0..steps {
            let mut ctx = ModelCtx::train(0, s as u64);
            let t0 = std::time::Instant::now();
            let out = net.forward(&batch.x, &mut ctx).unwrap();
            let l = Loss::CrossEntropy.compute(&out, &batch.y).unwrap();
            let t1 = std::time::Instant::now();
            let gs = l.backward().unwrap();
            let t2 = std::time::Instant::now();
            drop(gs);
            opt.step(&params, &grads, 0.01).unwrap();
            let t3 = std::time::Instant::now();
            f += (t1 - t0).as_secs_f64();
            b += (t2 - t1).as_secs_f64();
            o += (t3 - t2).as_secs_f64();
        }
        let k = 1e3 / steps as f64;
        println!(
            "forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
            f * k,
            b * k,
            o * k
        );
    }
    println!("{:.1} ms/step, {:.1} images/s", dt * 1e3, 16.0 / dt);
}
