//! GPU tests (feature `cuda`; `nccl` for the communicator): wick's ops on a CUDA device against
//! its CPU kernels, training on the GPU, and the NCCL communicator. They need a GPU: build them
//! with `cargo test --release --features cuda,nccl --test gpu --no-run` and run the binary on
//! a GPU machine (see docs/RESULTS.md for the last run). Without a GPU they fail.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use wick::rng::Rng;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

fn rand(r: &mut Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.next_f32() - 0.5).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the largest |a|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Runs `f` on CPU copies and GPU copies of `inputs`; compares the outputs and the gradients
/// of `sum(out · r)` with respect to every input.
fn same_on_both(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let mut r = Rng::keyed(5, name, 0);
    let run = |dev: &Device| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        (vars, f(&ts))
    };
    let (cv, cy) = run(&Device::Cpu);
    let (gv, gy) = run(&gpu());
    assert!(!gy.device().is_cpu());
    let e = rel(&cy, &gy);
    eprintln!("{name}: forward rel. error {e:.2e}");
    assert!(e < 1e-4, "{name}: forward differs by {e}");
    let w = rand(&mut r, cy.dims());
    let cg = (&cy * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (&gy * &w.to_device(&gpu()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, (c, g)) in cv.iter().zip(&gv).enumerate() {
        let (Some(a), Some(b)) = (cg.get(c.as_tensor()), gg.get(g.as_tensor())) else {
            panic!("{name}: no gradient for input {i}");
        };
        let e = rel(a, b);
        eprintln!("{name}: gradient {i} rel. error {e:.2e}");
        assert!(e < 1e-4, "{name}: gradient {i} differs by {e}");
    }
}

#[test]
fn ops_on_the_gpu_match_the_cpu_kernels() {
    use wick::model::{act, attention, conv, layer_norm, linear, pool};
    let mut r = Rng::keyed(1, "gpu-ops", 0);
    same_on_both(
        "linear",
        &[
            rand(&mut r, &[7, 13]),
            rand(&mut r, &[5, 13]),
            rand(&mut r, &[5]),
        ],
        |t| linear::linear(&t[0], &t[1], &t[2]).unwrap(),
    );
    same_on_both(
        "layer_norm",
        &[
            rand(&mut r, &[4, 6, 16]),
            rand(&mut r, &[16]),
            rand(&mut r, &[16]),
        ],
        |t| layer_norm::layer_norm(&t[0], &t[1], &t[2], 1e-12).unwrap(),
    );
    same_on_both("gelu", &[rand(&mut r, &[3, 50])], |t| {
        act::gelu(&t[0]).unwrap()
    });
    same_on_both(
        "add_relu",
        &[rand(&mut r, &[3, 50]), rand(&mut r, &[3, 50])],
        |t| act::add_relu(&t[0], &t[1]).unwrap(),
    );
    same_on_both(
        "conv2d 3x3 s2 p1",
        &[rand(&mut r, &[2, 9, 9, 4]), rand(&mut r, &[6, 4, 3, 3])],
        |t| {
            let spec = conv::ConvSpec {
                stride: 2,
                padding: 1,
                ..Default::default()
            };
            conv::conv2d(&t[0], &t[1], spec).unwrap()
        },
    );
    same_on_both("max_pool 3x3 s2 p1", &[rand(&mut r, &[2, 9, 9, 4])], |t| {
        let spec = pool::PoolSpec {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        pool::max_pool2d(&t[0], spec).unwrap()
    });
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    same_on_both("attention", &[rand(&mut r, &[2, 5, 3 * 8])], |t| {
        let spec = attention::AttentionSpec {
            heads: 2,
            dropout: 0.2,
            seed: 9,
        };
        attention::attention(&t[0], &mask.to_device(t[0].device()).unwrap(), spec).unwrap()
    });
}

#[test]
fn batch_norm_on_the_gpu_tracks_running_statistics() {
    use wick::model::batchnorm::BatchNorm2d;
    let layer = |d: &Device| BatchNorm2d {
        weight: Tensor::new(&[1.5f32, 0.5, 1.0], d).unwrap(),
        bias: Tensor::new(&[0.1f32, -0.2, 0.0], d).unwrap(),
        running_mean: Tensor::zeros(3, candle_core::DType::F32, d).unwrap(),
        running_var: Tensor::ones(3, candle_core::DType::F32, d).unwrap(),
        num_batches_tracked: Tensor::zeros((), candle_core::DType::F32, d).unwrap(),
        eps: 1e-5,
        momentum: 0.1,
    };
    let mut r = Rng::keyed(4, "gpu-bn", 0);
    let x = rand(&mut r, &[4, 5, 5, 3]);
    let (c, g) = (layer(&Device::Cpu), layer(&gpu()));
    let xg = x.to_device(&gpu()).unwrap();
    for _ in 0..3 {
        let (yc, yg) = (c.forward(&x, true).unwrap(), g.forward(&xg, true).unwrap());
        assert!(rel(&yc, &yg) < 1e-4, "training-mode output");
    }
    assert!(rel(&c.running_mean, &g.running_mean) < 1e-5, "running mean");
    assert!(rel(&c.running_var, &g.running_var) < 1e-5, "running var");
    let (yc, yg) = (
        c.forward(&x, false).unwrap(),
        g.forward(&xg, false).unwrap(),
    );
    assert!(rel(&yc, &yg) < 1e-4, "evaluation-mode output");
}

/// Trains `configs/digits_mlp.toml` (with `sets`) on `device`; returns the summary.
fn digits(device: &str, sets: &[&str], dir: &std::path::Path) -> wick::train::Summary {
    let mut o: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    o.push(format!("run.device={device:?}"));
    let cfg = wick::config::load(std::path::Path::new("configs/digits_mlp.toml"), &o).unwrap();
    let mut t = wick::train::Trainer::from_config(&cfg).unwrap();
    let run = wick::train::RunDir::create(&cfg, &t.schema, Some(dir)).unwrap();
    t.fit(&run, false).unwrap()
}

#[test]
fn the_digits_mlp_trains_on_the_gpu_as_on_the_cpu() {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).ok();
    let tmp = tempfile::tempdir().unwrap();
    let g = digits("cuda", &[], &tmp.path().join("gpu"));
    let c = digits("cpu", &[], &tmp.path().join("cpu"));
    let (ga, ca) = (
        g.final_metrics["eval_accuracy"],
        c.final_metrics["eval_accuracy"],
    );
    eprintln!(
        "digits MLP: GPU accuracy {ga:.4} ({:.0} samples/s), CPU {ca:.4} ({:.0} samples/s)",
        g.train_samples_per_s, c.train_samples_per_s
    );
    assert!(ga >= 0.95, "GPU accuracy {ga}");
    assert!((ga - ca).abs() <= 0.02, "GPU {ga} vs CPU {ca}");
}

#[test]
fn a_resnet_trains_on_the_gpu() {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).ok();
    let tmp = tempfile::tempdir().unwrap();
    // A narrow ResNet-18 on the 8×8 digits, every layer trained (BatchNorm in training mode,
    // the stem's overlapping max pool): the GPU paths of every op, forward and backward.
    let sets = [
        "model.kind=\"resnet\"",
        "model.input_shape=[1,8,8]",
        "model.width=16",
        "model.stages=2",
        "train.epochs=8",
        "optim.lr=3e-3",
    ];
    let g = digits("cuda", &sets, &tmp.path().join("gpu"));
    let c = digits("cpu", &sets, &tmp.path().join("cpu"));
    let (ga, ca) = (
        g.final_metrics["eval_accuracy"],
        c.final_metrics["eval_accuracy"],
    );
    eprintln!(
        "digits ResNet: GPU accuracy {ga:.4} ({:.0} samples/s), CPU {ca:.4} ({:.0} samples/s)",
        g.train_samples_per_s, c.train_samples_per_s
    );
    assert!(ga >= 0.85, "GPU accuracy {ga}");
    assert!((ga - ca).abs() <= 0.05, "GPU {ga} vs CPU {ca}");
}

#[cfg(feature = "nccl")]
#[test]
fn the_nccl_communicator_reduces_and_broadcasts() {
    use wick::dist::Communicator;
    let comm = wick::dist::nccl::Nccl::init(&wick::config::DistConfig::default()).unwrap();
    assert_eq!((comm.rank(), comm.world(), comm.backend()), (0, 1, "nccl"));
    let mut v: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let want = v.clone();
    comm.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, want);
    let mut d = vec![1.5f64, -2.0];
    comm.all_reduce_sum_f64(&mut d).unwrap();
    assert_eq!(d, [1.5, -2.0]);
    let s = comm.broadcast_string("run dir", 0).unwrap();
    assert_eq!(s, "run dir");
    comm.barrier().unwrap();
}
