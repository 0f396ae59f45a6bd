//! Checkpoints are plain safetensors with PyTorch-style names: Python reads them.

mod common;
use common::*;

use std::process::Command;

const READER: &str = r#"
import json, sys
from safetensors import safe_open
out = {}
for path in sys.argv[1:]:
    with safe_open(path, framework="np") as f:
        out[path] = {
            "metadata": f.metadata(),
            "tensors": {k: [list(f.get_tensor(k).shape), float(f.get_tensor(k).astype("float64").sum())] for k in f.keys()},
        }
print(json.dumps(out))
"#;

#[test]
fn python_safetensors_reads_weights_and_optimizer_state() {
    let Some(pypath) = python_with_safetensors() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = train(
        "configs/iris_mlp.toml",
        &tmp.path().join("iris"),
        &["--set", "train.epochs=3"],
    );
    let w = weights(&run);
    let opt = run.join("checkpoints/last/optimizer.safetensors");
    let o = Command::new("python3")
        .env("PYTHONPATH", &pypath)
        .args(["-c", READER])
        .arg(&w)
        .arg(&opt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let model = &v[w.to_str().unwrap()];
    assert_eq!(model["metadata"]["format"], "pt");
    let tensors = model["tensors"].as_object().unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "layers.0.bias",
            "layers.0.weight",
            "layers.1.bias",
            "layers.1.weight"
        ]
    );
    assert_eq!(tensors["layers.0.weight"][0], serde_json::json!([32, 4]));
    // Values: Python's sums equal ours.
    let bytes = std::fs::read(&w).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        let ours: f64 = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .sum();
        let theirs = tensors[&name][1].as_f64().unwrap();
        assert!((ours - theirs).abs() < 1e-9, "{name}: {ours} vs {theirs}");
    }
    let optim = v[opt.to_str().unwrap()]["tensors"].as_object().unwrap();
    assert!(optim.contains_key("layers.0.weight.exp_avg"));
    assert!(optim.contains_key("layers.0.weight.exp_avg_sq"));
    assert!(optim.contains_key("step"));
}
