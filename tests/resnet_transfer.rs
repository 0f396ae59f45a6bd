//! Transfer learning on real data: a ResNet pretrained on Fashion-MNIST (CI-sized config), then
//! a new head on 100 MNIST digits per class with the backbone frozen and its features cached,
//! against the same head on a randomly initialised frozen backbone.

mod common;

use std::path::Path;

use wick::train::{RunDir, Trainer};

/// What one arm of the comparison measured.
struct Arm {
    /// Test accuracy after each epoch.
    each: Vec<f64>,
    cached: bool,
    /// Seconds per epoch.
    epochs: Vec<f64>,
}

impl Arm {
    /// Test accuracy after the last epoch.
    fn last(&self) -> f64 {
        *self.each.last().expect("one test accuracy per epoch")
    }

    /// Mean test accuracy of the last 10 epochs.
    fn last10(&self) -> f64 {
        assert_eq!(self.each.len(), 60, "one test accuracy per epoch");
        self.each[self.each.len() - 10..].iter().sum::<f64>() / 10.0
    }
}

/// Trains `config` with `overrides` in `run_dir`.
fn transfer(config: &Path, run_dir: &Path, overrides: &[String]) -> Arm {
    let cfg = wick::config::load(config, overrides).unwrap();
    let mut trainer = Trainer::from_config(&cfg).unwrap();
    let clock = std::rc::Rc::new(std::cell::RefCell::new(common::clock::Clock::default()));
    trainer.add_callback(common::clock::Recorder(clock.clone()));
    let run = RunDir::create(&cfg, &trainer.schema, Some(run_dir)).unwrap();
    trainer.fit(&run, false).unwrap();
    let c = clock.borrow();
    Arm {
        each: c.accuracy.clone(),
        cached: c.cached,
        epochs: c.epochs(),
    }
}

#[test]
fn a_fashion_mnist_backbone_transfers_to_mnist_digits() {
    std::env::set_current_dir(common::root()).unwrap();
    let fashion = Path::new("data/fashion-mnist/train/manifest.json").is_file();
    let mnist = Path::new("data/mnist/train_100.csv").is_file();
    if !common::require_asset(
        fashion,
        "Fashion-MNIST shards (scripts/fetch-fashion-mnist.sh)",
    ) || !common::require_asset(mnist, "MNIST digits (scripts/fetch-mnist.sh)")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let backbone = common::train(
        "configs/fashion_resnet_ci.toml",
        &tmp.path().join("fashion"),
        &[],
    );
    let fashion_acc = common::final_metric(&backbone, "eval_accuracy");
    assert!(
        fashion_acc >= 0.85,
        "Fashion-MNIST pretraining reached {fashion_acc}"
    );

    let pretrained = format!("model.pretrained={:?}", backbone.display().to_string());
    let config = Path::new("configs/mnist_transfer.toml");
    let pre = transfer(
        config,
        &tmp.path().join("pre"),
        std::slice::from_ref(&pretrained),
    );
    assert!(
        pre.cached,
        "a frozen backbone without augmentation trains on cached features"
    );

    // The same head on the same (narrow) architecture, randomly initialised and frozen: the
    // config without `pretrained`.
    let mut cfg = wick::config::load(config, &[pretrained]).unwrap();
    cfg.model.pretrained = None;
    cfg.model.width = 16;
    let random_config = tmp.path().join("random.toml");
    std::fs::write(&random_config, cfg.to_toml()).unwrap();
    let random = transfer(&random_config, &tmp.path().join("random"), &[]);

    // The head's test accuracy swings from epoch to epoch on the random backbone (its
    // features are unnormalised: raw pixels through BatchNorm layers that never saw data), so
    // the comparison is on the mean of the last 10 epochs as well as the last.
    let (acc_pre, acc_random) = (pre.last(), random.last());
    let (mean_pre, mean_random) = (pre.last10(), random.last10());
    eprintln!(
        "fashion {fashion_acc:.4}; mnist head on pretrained backbone {acc_pre:.4} (last 10 epochs {mean_pre:.4}), on random backbone {acc_random:.4} ({mean_random:.4}); epoch 1 {:.4} s, epoch 2 {:.4} s",
        pre.epochs[0],
        pre.epochs.get(1).copied().unwrap_or(f64::NAN)
    );
    // The goal: 10 points. Measured 0.802 against 0.673 (+12.9) with this seed, and
    // +16 to +20 with seeds 1-4 (docs/RESULTS.md).
    assert!(
        mean_pre >= mean_random + 0.10,
        "pretrained {mean_pre:.4} should beat random {mean_random:.4} by 10 points (mean of the last 10 epochs)"
    );
    assert!(
        acc_pre >= acc_random + 0.05,
        "pretrained {acc_pre:.4} against random {acc_random:.4} at the last epoch"
    );
    assert!(acc_pre >= 0.78, "pretrained head reached {acc_pre:.4}");
    // Epoch 1 computed the backbone features of every sample; later epochs only train the head.
    assert!(pre.epochs.len() >= 2);

    // int8 (convolutions through im2col + the int8 GEMM, and the head): within 1 point.
    let o = common::wick()
        .arg("quantize")
        .arg(tmp.path().join("pre"))
        .args(["--json", "--iters", "2"])
        .output()
        .unwrap();
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "wick quantize failed:\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let acc = |side: &str| r[side]["metrics"]["accuracy"].as_f64().unwrap();
    eprintln!(
        "mnist transfer int8: f32 {:.4}, int8 {:.4}",
        acc("f32"),
        acc("int8")
    );
    assert!((acc("f32") - acc("int8")).abs() <= 0.01, "{r}");
    assert!(
        r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["kind"] == "conv2d" && l["status"] == "int8"),
        "{r}"
    );
}
