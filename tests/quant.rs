//! int8 quantization end to end: `wick quantize` on a trained digits MLP (dynamic and static),
//! quantized runs through `wick eval` / `wick predict`, damaged and mismatched checkpoints,
//! and MiniLM sentence embeddings in int8 against f32.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn quantize(run: &Path, args: &[&str]) -> serde_json::Value {
    let o = wick()
        .arg("quantize")
        .arg(run)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "wick quantize failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn eval_json(run: &Path) -> serde_json::Value {
    let o = wick().arg("eval").arg(run).arg("--json").output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "wick eval failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn eval_err(run: &Path) -> String {
    let o = wick().arg("eval").arg(run).output().unwrap();
    assert!(!o.status.success(), "eval of {} should fail", run.display());
    text(&o).1
}

#[test]
fn a_quantized_digits_mlp_keeps_its_accuracy_in_a_quarter_of_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train("configs/digits_mlp.toml", &tmp.path().join("run"), &[]);
    for mode in ["dynamic", "static"] {
        let out = tmp.path().join(mode);
        let r = quantize(&run, &["--mode", mode, "--out", out.to_str().unwrap()]);
        let acc = |side: &str| r[side]["metrics"]["accuracy"].as_f64().unwrap();
        eprintln!(
            "digits MLP {mode}: f32 {:.4}, int8 {:.4}; file {} -> {} bytes",
            acc("f32"),
            acc("int8"),
            r["f32"]["file_bytes"],
            r["int8"]["file_bytes"]
        );
        assert!(acc("f32") > 0.95, "{r}");
        assert!((acc("f32") - acc("int8")).abs() <= 0.01, "{mode}: {r}");
        let ratio =
            r["int8"]["file_bytes"].as_f64().unwrap() / r["f32"]["file_bytes"].as_f64().unwrap();
        if mode == "dynamic" {
            assert_eq!(r["layers_int8"], 3, "{r}");
            assert!(ratio <= 0.30, "int8 file is {ratio:.2} of f32");
        } else {
            // One range per layer fits the raw pixel inputs of the first layer poorly: the
            // sensitivity check measures it (about 8% error) and keeps that layer in f32.
            assert!(r["layers_int8"].as_u64().unwrap() >= 2, "{r}");
            for l in r["layers"].as_array().unwrap() {
                let s = l["status"].as_str().unwrap();
                assert!(s == "int8" || s.starts_with("f32 (error"), "{l}");
            }
        }
        // The quantized directory evaluates like a run, to the same figures.
        let e = eval_json(&out);
        assert_eq!(e["metrics"]["accuracy"], r["int8"]["metrics"]["accuracy"]);
        assert!(e["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("model.int8.safetensors"));
        let meta = std::fs::read_to_string(out.join("quantize.json")).unwrap();
        assert!(meta.contains(&format!("\"mode\": \"{mode}\"")), "{meta}");
    }
    // Predictions from the int8 run, on rows of the data file.
    let o = wick()
        .arg("predict")
        .arg(tmp.path().join("dynamic"))
        .args(["--input", "data/sklearn/digits.csv"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.lines().count(), 1 + 1797, "header + one line per row");

    // --skip keeps a layer in f32, and a pattern that matches nothing is an error.
    let r = quantize(
        &run,
        &[
            "--skip",
            "layers.2",
            "--out",
            tmp.path().join("skip").to_str().unwrap(),
        ],
    );
    assert_eq!(r["layers_int8"], 2);
    assert_eq!(r["layers"][2]["status"], "f32 (skipped)");
    let o = wick()
        .arg("quantize")
        .arg(&run)
        .args(["--skip", "decoder.*"])
        .output()
        .unwrap();
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("--skip \"decoder.*\" matches no quantizable layer"),
        "{err}"
    );
    // A sensitivity threshold no layer meets keeps everything in f32.
    let r = quantize(
        &run,
        &[
            "--max-error",
            "0",
            "--out",
            tmp.path().join("strict").to_str().unwrap(),
        ],
    );
    assert_eq!(r["layers_int8"], 0, "{r}");
    assert!(r["layers"][0]["status"]
        .as_str()
        .unwrap()
        .starts_with("f32 (error"));
}

#[test]
fn damaged_and_mismatched_quantized_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train("configs/digits_mlp.toml", &tmp.path().join("run"), &[]);
    let q = tmp.path().join("q");
    quantize(&run, &["--out", q.to_str().unwrap()]);
    let file = q.join("model.int8.safetensors");
    let good = std::fs::read(&file).unwrap();

    // One flipped byte in the weights.
    let mut bad = good.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x40;
    std::fs::write(&file, &bad).unwrap();
    let err = eval_err(&q);
    assert!(
        err.contains("model.int8.safetensors: checksum mismatch"),
        "{err}"
    );

    // Truncated.
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    let err = eval_err(&q);
    assert!(err.contains("damaged or truncated"), "{err}");

    // An f32 checkpoint under the int8 name.
    std::fs::copy(weights(&run), &file).unwrap();
    let err = eval_err(&q);
    assert!(err.contains("not a wick int8 checkpoint"), "{err}");

    // The int8 weights of a differently shaped MLP.
    let other = train(
        "configs/digits_mlp.toml",
        &tmp.path().join("other"),
        &["--set", "model.hidden=[32]"],
    );
    let q2 = tmp.path().join("q2");
    quantize(&other, &["--out", q2.to_str().unwrap()]);
    std::fs::copy(q2.join("model.int8.safetensors"), &file).unwrap();
    let err = eval_err(&q);
    assert!(
        err.contains("the quantized weights do not match the model"),
        "{err}"
    );
    assert!(err.contains("has shape"), "{err}");

    // Quantizing a quantized directory.
    let o = wick().arg("quantize").arg(&q2).output().unwrap();
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("already quantized"),
        "{err}"
    );

    // An --out that is the run itself, or another run: refused, and both runs stay whole.
    let config = std::fs::read(run.join("config.toml")).unwrap();
    for (out, want) in [
        (&run, "that is the run being quantized"),
        (&other, "holds another run"),
    ] {
        let o = wick()
            .arg("quantize")
            .arg(&run)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        let err = text(&o).1;
        assert!(!o.status.success() && err.contains(want), "{err}");
    }
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config);
    assert!(!other.join("model.int8.safetensors").exists());
    eval_json(&run);
    eval_json(&other);

    // A negative or NaN error bound.
    for e in ["-1", "NaN"] {
        let o = wick()
            .args(["quantize", &format!("--max-error={e}")])
            .arg(&run)
            .output()
            .unwrap();
        let err = text(&o).1;
        assert!(
            !o.status.success() && err.contains("expected a relative error of 0 or more"),
            "{e}: {err}"
        );
    }
}

#[test]
fn library_quantize_turns_a_model_int8_in_place() {
    use wick::model::ModelCtx;
    let cfg = wick::config::load(Path::new("configs/iris_mlp.toml"), &[]).unwrap();
    std::env::set_current_dir(root()).unwrap();
    let trainer = wick::train::Trainer::from_config(&cfg).unwrap();
    let model =
        wick::model::build(&cfg.model, &trainer.schema, 7, &candle_core::Device::Cpu).unwrap();
    let x = candle_core::Tensor::from_vec(
        vec![0.5f32, -1.0, 2.0, 0.25],
        (1, 4),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let f32_out: Vec<f32> = model
        .forward(&x, &mut ModelCtx::eval())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let report =
        wick::quant::quantize(model.as_ref(), &wick::quant::QuantConfig::default(), None).unwrap();
    assert_eq!(report.quantized(), model.quant_layers().len());
    assert!(model.store().quantized("layers.0.weight").is_some());
    let q_out: Vec<f32> = model
        .forward(&x, &mut ModelCtx::eval())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(f32_out, q_out, "the int8 path ran");
    let e = wick::quant::rel_error(&f32_out, &q_out);
    assert!(e < 0.05, "int8 output error {e}");
    // Static mode needs calibration data.
    let err = wick::quant::quantize(
        model.as_ref(),
        &wick::quant::QuantConfig {
            mode: wick::quant::QuantMode::Static,
            ..Default::default()
        },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("static quantization needs calibration batches"),
        "{err}"
    );
}

fn minilm() -> Option<PathBuf> {
    let dir = root().join("checkpoints/pretrained/all-MiniLM-L6-v2");
    require_asset(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 (scripts/fetch-minilm.sh)",
    )
    .then_some(dir)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum();
    let na: f64 = a.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn int8_minilm_embeddings_stay_within_cosine_0_99_of_f32() {
    let Some(dir) = minilm() else { return };
    let text = std::fs::read_to_string(root().join("tests/fixtures/sentences.txt")).unwrap();
    let sentences: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(sentences.len(), 50);
    let enc = wick::model::bert::SentenceEncoder::load(dir.to_str().unwrap(), 128).unwrap();
    let want = enc.embed(&sentences).unwrap();
    let report =
        wick::quant::quantize(&enc.bert, &wick::quant::QuantConfig::default(), None).unwrap();
    assert_eq!(report.quantized(), report.layers.len(), "{report:?}");
    let got = enc.embed(&sentences).unwrap();
    let cos: Vec<f64> = want.iter().zip(&got).map(|(a, b)| cosine(a, b)).collect();
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let min = cos.iter().cloned().fold(1.0, f64::min);
    eprintln!("int8 MiniLM against f32 on 50 sentences: mean cosine {mean:.5}, min {min:.5}");
    assert!(mean >= 0.99, "mean cosine {mean}");
    assert!(want != got, "the int8 path ran");
}
