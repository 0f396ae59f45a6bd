//! torchvision-layout state dicts (safetensors and `.pth`) load into wick's ResNet with no
//! missing or unexpected names; mismatched ones are rejected with every bad name listed; the
//! `hf:` path reads the Hugging Face hub cache; wick run directories serve as backbones.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use wick::config::{ModelConfig, ModelKind, Task};
use wick::data::Schema;
use wick::model::{build_resnet, pretrained, Model};

/// Writes the fixtures of `tests/fixtures/torchvision_state_dict.py` into `dir`.
fn fixtures(dir: &Path) -> bool {
    let Some(pypath) = common::python_with_safetensors() else {
        return false;
    };
    let o = Command::new("python3")
        .env("PYTHONPATH", pypath)
        .arg(common::root().join("tests/fixtures/torchvision_state_dict.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    true
}

fn image_schema(classes: usize) -> Schema {
    Schema {
        features: vec!["image[3x32x32]".into()],
        input_dim: 3 * 32 * 32,
        modality: "image".into(),
        data_hash: String::new(),
        label: "label".into(),
        task: Task::Classification,
        classes: (0..classes).map(|i| i.to_string()).collect(),
        mean: Vec::new(),
        std: Vec::new(),
        input_shape: vec![3, 32, 32],
    }
}

fn resnet_cfg(pretrained: &Path) -> ModelConfig {
    ModelConfig {
        kind: ModelKind::Resnet,
        pretrained: Some(pretrained.display().to_string()),
        ..Default::default()
    }
}

fn value(model: &dyn Model, name: &str) -> Vec<f32> {
    let v = model
        .store()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"));
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn torchvision_state_dicts_load_unchanged_and_mismatches_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let dev = Device::Cpu;
    let st = dir.path().join("resnet18.safetensors");
    let pth = dir.path().join("resnet18.pth");
    let reference = pretrained::read_weights(&st, &dev).unwrap();
    let from_pth = pretrained::read_weights(&pth, &dev).unwrap();
    assert_eq!(
        reference.keys().collect::<Vec<_>>(),
        from_pth.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        reference.len(),
        122,
        "torchvision resnet18 has 122 state-dict entries"
    );

    for file in [&st, &pth] {
        // With torchvision's own 1000-class head, every name matches: nothing missing or extra.
        let net = build_resnet(&resnet_cfg(file), &image_schema(1000), 0, &dev).unwrap();
        let names: Vec<String> = net.store().params().into_iter().map(|p| p.name).collect();
        let mut want: Vec<&String> = reference.keys().collect();
        want.sort();
        assert_eq!(names.iter().collect::<Vec<_>>(), want, "{}", file.display());
        for name in [
            "conv1.weight",
            "layer3.0.downsample.0.weight",
            "layer4.1.bn2.running_var",
            "bn1.num_batches_tracked",
        ] {
            let want: Vec<f32> = reference[name]
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(value(&net, name), want, "{name} from {}", file.display());
        }
        // A new 10-class head: the backbone loads, the head starts fresh.
        let net = build_resnet(&resnet_cfg(file), &image_schema(10), 0, &dev).unwrap();
        assert_eq!(value(&net, "fc.bias").len(), 10);
        assert_eq!(value(&net, "layer2.1.conv2.weight").len(), 128 * 128 * 9);
    }

    let bad = dir.path().join("resnet18_renamed.pth");
    let err = build_resnet(&resnet_cfg(&bad), &image_schema(10), 0, &dev)
        .err()
        .expect("a mismatched state dict must be rejected")
        .to_string();
    for name in [
        "layer1.0.conv1.weight",
        "layer1.0.conv_1.weight",
        "layer2.0.bn2.bias",
        "layer2.0.bn9.bias",
        "layer4.1.bn2.running_var",
    ] {
        assert!(err.contains(name), "error should name {name}: {err}");
    }
    assert!(err.contains("resnet18_renamed.pth"), "{err}");
    assert!(
        err.contains("missing [") && err.contains("unexpected ["),
        "{err}"
    );

    // A ResNet-34 file for a ResNet-18 model: the extra blocks are listed as unexpected.
    let mut cfg = resnet_cfg(&st);
    cfg.arch = wick::config::ResnetArch::Resnet34;
    let err = build_resnet(&cfg, &image_schema(10), 0, &dev)
        .err()
        .expect("wrong depth")
        .to_string();
    assert!(err.contains("missing [layer1.2.bn1.bias"), "{err}");
}

#[test]
fn hf_repositories_are_read_from_the_hub_cache() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    // The hub cache layout: models--OWNER--NAME/{refs/main, snapshots/<commit>/FILE}.
    let cache = dir.path().join("hub");
    let repo = cache.join("models--acme--resnet18-test");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::copy(
        dir.path().join("resnet18.safetensors"),
        repo.join("snapshots")
            .join(commit)
            .join("model.safetensors"),
    )
    .unwrap();
    // Only this test touches HF_HUB_CACHE in this test binary's process.
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let (origin, w) = pretrained::load("hf:acme/resnet18-test", &Device::Cpu).unwrap();
    assert!(origin.ends_with("model.safetensors"), "{origin}");
    assert_eq!(w.len(), 122);
    let cfg = ModelConfig {
        kind: ModelKind::Resnet,
        pretrained: Some("hf:acme/resnet18-test".into()),
        freeze: "backbone".into(),
        ..Default::default()
    };
    let net = build_resnet(&cfg, &image_schema(10), 0, &Device::Cpu).unwrap();
    assert!(!net.store().is_trainable("conv1.weight"));
    assert!(net.store().is_trainable("fc.weight"));
    // A repository that is neither cached nor reachable: a clear error.
    let err = pretrained::load("hf:acme/not-cached", &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("hf:acme/not-cached"), "{err}");
}

/// A tiny ResNet on the 8×8 digits: BatchNorm running statistics are checkpointed, so a run
/// cut mid-epoch and resumed ends byte-identical to an uninterrupted one, with 1 or 2 threads.
#[test]
fn resnet_runs_resume_exactly_and_do_not_depend_on_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--set",
        "model.kind=\"resnet\"",
        "--set",
        "model.width=8",
        "--set",
        "model.stages=2",
        "--set",
        "model.input_shape=[1, 8, 8]",
        "--set",
        "model.dropout=0.1",
        "--set",
        "train.epochs=8",
        "--set",
        "train.checkpoint_every=5",
    ];
    let full = common::train("configs/digits_mlp.toml", &tmp.path().join("full"), &args);
    let acc = common::final_metric(&full, "eval_accuracy");
    assert!(acc > 0.75, "a small ResNet learns the digits: {acc}");
    let one = tmp.path().join("one");
    let mut a1: Vec<&str> = args.to_vec();
    a1.extend(["--threads", "1"]);
    common::train("configs/digits_mlp.toml", &one, &a1);
    assert_eq!(
        common::sha256(&common::weights(&full)),
        common::sha256(&common::weights(&one)),
        "weights differ between 1 and 2 threads"
    );
    // 23 steps per epoch; abort at step 30, mid-epoch 2; the last checkpoint is at step 30.
    let cut = tmp.path().join("cut");
    let o = common::wick()
        .args(["train", "configs/digits_mlp.toml", "--quiet", "--run-dir"])
        .arg(&cut)
        .args(args)
        .args(["--abort-after-steps", "33"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "the aborted run must fail");
    let o = common::wick()
        .args(["train", "--quiet", "--resume"])
        .arg(&cut)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        common::sha256(&common::weights(&full)),
        common::sha256(&common::weights(&cut)),
        "resumed weights (BatchNorm statistics included) differ"
    );
    let st = safetensors::SafeTensors::deserialize(&std::fs::read(common::weights(&full)).unwrap())
        .unwrap()
        .names()
        .into_iter()
        .any(|n| n == "layer2.0.downsample.1.running_var");
    assert!(st, "running statistics are saved in the checkpoint");

    // `wick predict --image`: PNGs through the run's input shape, top-k with probabilities.
    let png = tmp.path().join("digit.png");
    image::GrayImage::from_fn(16, 16, |x, y| {
        image::Luma([if (4..12).contains(&x) && y % 15 > 2 {
            255
        } else {
            0
        }])
    })
    .save(&png)
    .unwrap();
    let o = common::wick()
        .args(["predict"])
        .arg(&full)
        .arg("--image")
        .arg(&png)
        .arg(&png)
        .args(["--top-k", "3"])
        .output()
        .unwrap();
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        8,
        "two images, a header and 3 classes each:\n{out}"
    );
    assert!(
        lines[0].contains("digit.png") && lines[0].contains(" ms)"),
        "{out}"
    );
    let probs: Vec<f64> = lines[1..4]
        .iter()
        .map(|l| l.split_whitespace().last().unwrap().parse().unwrap())
        .collect();
    assert!(
        probs.windows(2).all(|w| w[0] >= w[1]) && probs[0] > 0.0,
        "{out}"
    );
    assert_eq!(
        lines[1..4],
        lines[5..8],
        "the same image gives the same answer"
    );
    // A run trained on plain features cannot take images without a shape.
    let mlp = common::train("configs/iris_mlp.toml", &tmp.path().join("iris"), &[]);
    let o = common::wick()
        .args(["predict"])
        .arg(&mlp)
        .arg("--image")
        .arg(&png)
        .output()
        .unwrap();
    let (_, err) = common::text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("not trained on images") && err.contains("--input"),
        "{err}"
    );
}
