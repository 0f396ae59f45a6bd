//! Shards: packing Fashion-MNIST, reading it back from Python, training on it, and every kind
//! of corruption giving a specific error.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn fashion_available() -> bool {
    require_asset(
        Path::new(FASHION)
            .join("t10k-images-idx3-ubyte.gz")
            .is_file(),
        "Fashion-MNIST (Debian dataset-fashion-mnist)",
    )
}

/// Packs the 10k-image Fashion-MNIST test split into `out` (small shards, so there are several).
fn pack_test_split(out: &Path) {
    let o = wick()
        .args(["data", "pack", "idx", "--shard-size", "2MiB", "--images"])
        .arg(format!("{FASHION}/t10k-images-idx3-ubyte.gz"))
        .arg("--labels")
        .arg(format!("{FASHION}/t10k-labels-idx1-ubyte.gz"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
}

fn verify(dir: &Path) -> (bool, String) {
    let o = wick().args(["data", "verify"]).arg(dir).output().unwrap();
    let (out, err) = text(&o);
    (o.status.success(), out + &err)
}

#[test]
fn fashion_packs_verifies_and_python_reads_the_same_pixels() {
    if !fashion_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fm");
    pack_test_split(&dir);
    let (ok, msg) = verify(&dir);
    assert!(ok, "{msg}");
    assert!(msg.contains("ok: 10000 samples in 4 shard(s)"), "{msg}");

    let Some(pypath) = python_with_safetensors() else {
        return;
    };
    let script = r#"
import gzip, json, sys, numpy as np
from safetensors.numpy import load_file
d, src = sys.argv[1], sys.argv[2]
raw = gzip.open(src + "/t10k-images-idx3-ubyte.gz").read()
idx = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
lab = np.frombuffer(gzip.open(src + "/t10k-labels-idx1-ubyte.gz").read(), dtype=np.uint8, offset=8)
m = json.load(open(d + "/manifest.json"))
imgs, labels = [], []
for s in m["shards"]:
    t = load_file(d + "/" + s["file"])
    assert t["image"].dtype == np.uint8 and t["image"].shape[1:] == (28, 28)
    imgs.append(t["image"]); labels.append(t["label"])
imgs, labels = np.concatenate(imgs), np.concatenate(labels)
assert imgs.shape == idx.shape, (imgs.shape, idx.shape)
assert (imgs == idx).all(), "pixels differ"
assert (labels == lab.astype(np.int64)).all(), "labels differ"
print("same", imgs.shape[0])
"#;
    let o = Command::new("python3")
        .env("PYTHONPATH", &pypath)
        .args(["-c", script])
        .arg(&dir)
        .arg(FASHION)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out.trim(), "same 10000");
}

#[test]
fn the_mlp_reaches_85_percent_on_packed_fashion_mnist() {
    let train = root().join("data/fashion-mnist/train/manifest.json");
    if !require_asset(
        train.is_file(),
        "packed Fashion-MNIST (scripts/fetch-fashion-mnist.sh)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = common::train("configs/fashion_mlp.toml", &tmp.path().join("fm"), &[]);
    let acc = final_metric(&run, "eval_accuracy");
    assert!(acc >= 0.85, "Fashion-MNIST test accuracy {acc} < 0.85");
    assert_eq!(summary(&run)["epochs_completed"], 5);
}

/// A fresh copy of a packed dataset to damage.
fn damaged_copy(src: &Path, tmp: &Path, name: &str) -> PathBuf {
    let dst = tmp.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn expect_error(dir: &Path, want: &[&str]) {
    let (ok, msg) = verify(dir);
    assert!(!ok, "verify passed on a damaged dataset");
    assert!(!msg.contains("panicked"), "{msg}");
    assert_eq!(msg.trim_end().lines().count(), 1, "one line: {msg}");
    for w in want {
        assert!(msg.contains(w), "expected `{w}` in: {msg}");
    }
}

#[test]
fn each_corruption_gives_a_specific_error() {
    if !fashion_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    pack_test_split(&good);
    let shard = "shard-00001.safetensors";

    // Truncated shard.
    let d = damaged_copy(&good, tmp.path(), "truncated");
    let f = d.join(shard);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    expect_error(&d, &[shard, "truncated", "re-run `wick data pack`"]);

    // One flipped byte in the pixel data: only the checksum can tell.
    let d = damaged_copy(&good, tmp.path(), "flipped");
    let f = d.join(shard);
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    expect_error(&d, &[shard, "checksum mismatch"]);
    // Training on it fails the same way before any step.
    let cfg = tmp.path().join("flipped.toml");
    std::fs::write(&cfg, format!("[data]\npath = \"{}\"\n", d.display())).unwrap();
    let o = wick()
        .arg("train")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(tmp.path().join("r"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("checksum mismatch") && err.contains(shard),
        "{err}"
    );

    // Manifest edits.
    let d = damaged_copy(&good, tmp.path(), "count");
    edit_manifest(&d, |m| m["num_samples"] = 10001.into());
    expect_error(
        &d,
        &[
            "manifest.json",
            "num_samples is 10001 but the shards hold 10000",
        ],
    );

    let d = damaged_copy(&good, tmp.path(), "samples");
    edit_manifest(&d, |m| {
        let old = m["shards"][1]["samples"].as_u64().unwrap();
        m["shards"][1]["samples"] = 2000.into();
        m["num_samples"] = (10000 - old + 2000).into();
    });
    expect_error(&d, &[shard, "tensor `image` has shape"]);

    let d = damaged_copy(&good, tmp.path(), "dtype");
    edit_manifest(&d, |m| m["fields"][0]["dtype"] = "f32".into());
    expect_error(
        &d,
        &["tensor `image` is U8, but the manifest says field `image` is F32"],
    );

    let d = damaged_copy(&good, tmp.path(), "field");
    edit_manifest(&d, |m| {
        m["fields"][0]["name"] = "pixels".into();
        // The statistics follow the field (stats of a field that does not exist are refused
        // when the manifest is read).
        if let Some(st) = m["stats"].as_object_mut() {
            if let Some(v) = st.remove("image") {
                st.insert("pixels".into(), v);
            }
        }
    });
    expect_error(&d, &["missing tensor `pixels` for field `pixels`"]);

    let d = damaged_copy(&good, tmp.path(), "missing");
    std::fs::remove_file(d.join(shard)).unwrap();
    expect_error(&d, &[shard, "cannot open a shard listed in the manifest"]);

    let d = damaged_copy(&good, tmp.path(), "json");
    std::fs::write(d.join("manifest.json"), "{\"format\": \"wick-shards\",").unwrap();
    expect_error(&d, &["manifest.json", "invalid manifest JSON"]);

    // The damage-free copy still verifies.
    let (ok, msg) = verify(&good);
    assert!(ok, "{msg}");
}

/// CSV tables that cannot be packed faithfully: one line naming the line, column and fix
/// (duplicate names used to panic; NaN and inf were packed into a manifest nothing could read).
#[test]
fn packing_refuses_what_training_could_not_use() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, csv, extra, want) in [
        (
            "dup",
            "a,a,target\nx,p,0\ny,q,1\n",
            &[][..],
            "the header names column `a` twice",
        ),
        (
            "nan",
            "a,b,target\n1,NaN,0\n2,3,1\n",
            &[],
            "line 2, column `b`: \"NaN\" is not a finite number",
        ),
        (
            "big",
            "a,b,target\n1,2,0\n2,1e39,1\n",
            &[],
            "line 3, column `b`: \"1e39\" is not a finite number",
        ),
        (
            "reginf",
            "a,target\n1,0.5\n2,inf\n",
            &["--regression"],
            "line 3: label \"inf\" is not a finite number",
        ),
        (
            "nolabel",
            "a,target\n1,x\n2,\n",
            &[],
            "line 3: the label `target` is empty",
        ),
        (
            "only",
            "target\n0\n1\n",
            &[],
            "the label `target` is the only column",
        ),
        ("empty", "", &[], "the file is empty"),
    ] {
        let path = tmp.path().join(format!("{name}.csv"));
        std::fs::write(&path, csv).unwrap();
        let o = wick()
            .args(["data", "pack", "--out"])
            .arg(tmp.path().join(name))
            .arg("csv")
            .arg(&path)
            .args(extra)
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(
            err.contains(want) && err.contains(&format!("{name}.csv")),
            "{name}: {err}"
        );
    }
}

/// Labels that are not class indices of the manifest, a single class, and real-valued labels
/// asked to be classes: one clear error each, before any training (they used to build a
/// model on the wrong classes, or panic).
#[test]
fn labels_that_cannot_be_classes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pack = |name: &str, csv: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = wick()
            .args(["data", "pack", "--out"])
            .arg(&out)
            .args(["csv", csv])
            .args(extra)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
        out
    };
    let train_err = |data: &Path, sets: &[&str]| {
        let o = wick()
            .arg("train")
            .arg(root().join("configs/iris_mlp.toml"))
            .args([
                "--set",
                &format!("data.path={:?}", data.display().to_string()),
            ])
            .args(["--set", "data.label=\"label\""])
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .args(["--quiet", "--run-dir"])
            .arg(data.with_extension("run"))
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(!data.with_extension("run").exists());
        err
    };
    let good = pack("good", "data/sklearn/iris.csv", &[]);
    let short = damaged_copy(&good, tmp.path(), "short");
    edit_manifest(&short, |m| {
        m["classes"] = serde_json::json!(["setosa", "versicolor"]);
    });
    let e = train_err(&short, &[]);
    assert!(
        e.contains("has label 2, but the classes are numbered 0 to 1"),
        "{e}"
    );
    let one = damaged_copy(&good, tmp.path(), "one");
    edit_manifest(&one, |m| m["classes"] = serde_json::json!(["setosa"]));
    let e = train_err(&one, &[]);
    assert!(e.contains("has a single class (setosa)"), "{e}");
    // The label as the input: it would train on the answer.
    let e = train_err(&good, &["data.input=\"label\""]);
    assert!(
        e.contains("data.input and the label are both `label`"),
        "{e}"
    );
    let reg = pack("reg", "data/sklearn/digits.csv", &["--regression"]);
    let e = train_err(&reg, &["data.task=\"classification\""]);
    assert!(
        e.contains("holds real values") && e.contains("data.task = \"regression\""),
        "{e}"
    );
}

#[test]
fn training_on_shards_resumes_exactly() {
    if !fashion_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fm");
    pack_test_split(&data);
    let cfg = tmp.path().join("fm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\npath = \"{}\"\ntest_fraction = 0.2\n[model]\nhidden = [64]\ndropout = 0.1\n[train]\nepochs = 2\nbatch_size = 100\ncheckpoint_every = 7\n",
            data.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let full = common::train(cfg, &tmp.path().join("full"), &[]);
    let cut = tmp.path().join("cut");
    let o = wick()
        .args([
            "train",
            cfg,
            "--quiet",
            "--abort-after-steps",
            "100",
            "--run-dir",
        ])
        .arg(&cut)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = wick()
        .args(["train", "--quiet", "--resume"])
        .arg(&cut)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(sha256(&weights(&full)), sha256(&weights(&cut)));
    assert!(final_metric(&full, "eval_accuracy") > 0.75);

    // The shard-aware block shuffle trains as well and is reproducible across thread counts.
    let args = |t: &'static str| {
        [
            "--threads",
            t,
            "--set",
            "data.shuffle=\"block\"",
            "--set",
            "data.shuffle_window=2",
        ]
    };
    let a = common::train(cfg, &tmp.path().join("block1"), &args("1"));
    let b = common::train(cfg, &tmp.path().join("block2"), &args("2"));
    assert_eq!(sha256(&weights(&a)), sha256(&weights(&b)));
    assert_ne!(sha256(&weights(&a)), sha256(&weights(&full)));
    assert!(final_metric(&a, "eval_accuracy") > 0.75);
}
