//! The README's main job: the digits MLP reaches ≥ 0.97 test accuracy, and the run directory
//! holds everything a run must record.

mod common;
use common::*;

#[test]
fn digits_mlp_reaches_97_percent_and_records_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train("configs/digits_mlp.toml", &tmp.path().join("digits"), &[]);
    let acc = final_metric(&run, "eval_accuracy");
    assert!(acc >= 0.97, "digits test accuracy {acc} < 0.97");

    for f in [
        "config.toml",
        "dataset.json",
        "metrics.jsonl",
        "metrics.csv",
        "curves.png",
        "summary.json",
        "checkpoints/last/model.safetensors",
        "checkpoints/last/optimizer.safetensors",
        "checkpoints/last/trainer.json",
        "checkpoints/best/model.safetensors",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    // One metrics line per epoch; the CSV has a header plus the same rows.
    let jsonl = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 20);
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 21);
    assert!(csv.starts_with("epoch,step,"), "{csv}");
    // The PNG is a real PNG.
    let png = std::fs::read(run.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let s = summary(&run);
    assert_eq!(s["wick_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["epochs_completed"], 20);
    assert_eq!(s["steps"], 20 * 23);
    assert!(s["train_samples_per_s"].as_f64().unwrap() > 0.0);
    assert!(s["best"]["value"].as_f64().unwrap() >= acc);
    // The resolved config records every default and the version.
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("wick {}", env!("CARGO_PKG_VERSION"))));
    assert!(
        cfg.contains("batch_size = 64") && cfg.contains("clip_norm = 0.0"),
        "{cfg}"
    );
    let hash = s["config_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 12);

    // `wick runs` lists it with its seed and config hash.
    let o = wick().args(["runs"]).arg(tmp.path()).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let row = out.lines().find(|l| l.starts_with("digits ")).expect(&out);
    assert!(row.contains("42") && row.contains(hash), "{row}");

    // `wick eval` reproduces the best checkpoint's accuracy on the held-out split.
    let o = wick().args(["eval", "--json"]).arg(&run).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let eval_acc = v["metrics"]["accuracy"].as_f64().unwrap();
    assert!((eval_acc - s["best"]["value"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(v["samples"], 359);
}

#[test]
fn xor_gets_all_four_rows_right() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train("configs/xor.toml", &tmp.path().join("xor"), &[]);
    assert_eq!(final_metric(&run, "eval_accuracy"), 1.0);
    let o = wick()
        .args(["predict", "--input", "data/xor.csv"])
        .arg(&run)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let labels: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(labels, ["0", "1", "1", "0"], "{out}");
}

#[test]
fn iris_classifies_named_classes_and_predict_json_works() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train(
        "configs/iris_mlp.toml",
        &tmp.path().join("iris"),
        &["--set", "train.epochs=60"],
    );
    assert!(final_metric(&run, "eval_accuracy") >= 0.9);
    let o = wick()
        .args(["predict", "--json", "--input", "data/sklearn/iris.csv"])
        .arg(&run)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["label"], "setosa");
    let p: f64 = first["probabilities"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((p - 1.0).abs() < 1e-5);
}

#[test]
fn regression_reports_mse() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train("configs/iris_regression.toml", &tmp.path().join("reg"), &[]);
    let mse = final_metric(&run, "eval_mse");
    let mae = final_metric(&run, "eval_mae");
    assert!(mse.is_finite() && mae.is_finite());
    // Petal width has variance ≈ 0.58 (predicting the mean); the other measurements explain
    // most of it.
    assert!(mse < 0.1, "mse {mse}");
}
