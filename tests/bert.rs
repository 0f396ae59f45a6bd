//! BERT: embedding parity with all-MiniLM-L6-v2 as published, fine-tuning and the frozen
//! encoder on SpamAssassin, and errors on bad input.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn minilm() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints/pretrained/all-MiniLM-L6-v2");
    require_asset(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 (scripts/fetch-minilm.sh)",
    )
    .then_some(dir)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_embeddings_match_the_published_values_in_a_padded_batch() {
    let Some(dir) = minilm() else { return };
    let enc = wick::model::bert::SentenceEncoder::load(dir.to_str().unwrap(), 128).unwrap();
    // One batch: the short sentence is padded to the longest.
    let texts = [
        "The cat sits outside",
        "A man is eating food.",
        "A man is eating a piece of bread.",
    ];
    let e = enc.embed(&texts).unwrap();
    let want = [
        0.13919106f32,
        0.003029111,
        0.047014732,
        0.03957378,
        -0.047998514,
        -0.0068115355,
    ];
    for (i, (&got, &w)) in e[0].iter().zip(&want).enumerate() {
        assert!(
            (got - w).abs() < 1e-5,
            "value {i}: {got} vs {w}; {:?}",
            &e[0][..6]
        );
    }
    let c = cosine(&e[1], &e[2]);
    assert!((c - 0.7553).abs() <= 0.001, "cosine {c}");
    // Alone (no padding) the embedding is the same.
    let alone = enc.embed(&texts[..1]).unwrap();
    for (a, b) in alone[0].iter().zip(&e[0]) {
        assert!((a - b).abs() < 1e-5);
    }
    let norm: f32 = e[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    // In a batch of 48 sequences (rows in many tasks of the packed-weight kernel, used on
    // CPUs with AVX-512F), the values are the published ones too.
    let mut many = texts.to_vec();
    many.extend(std::iter::repeat_n(texts[2], 45));
    let big = enc.embed(&many).unwrap();
    for (i, (&got, &w)) in big[0].iter().zip(&want).enumerate() {
        assert!(
            (got - w).abs() < 1e-5,
            "batch of {}: value {i}: {got} vs {w}",
            many.len()
        );
    }
    let c = cosine(&big[1], &big[2]);
    assert!(
        (c - 0.7553).abs() <= 0.001,
        "batch of {}: cosine {c}",
        many.len()
    );
}

fn spam() -> bool {
    require_asset(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/spam/shards/manifest.json")
            .is_file(),
        "SpamAssassin shards (scripts/fetch-spam.sh)",
    )
}

#[test]
fn a_frozen_minilm_head_classifies_spam_from_cached_embeddings() {
    if minilm().is_none() || !spam() {
        return;
    }
    std::env::set_current_dir(root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = wick::config::load(
        Path::new("configs/spam_bert_frozen.toml"),
        &["train.epochs=12".into()],
    )
    .unwrap();
    let mut trainer = wick::train::Trainer::from_config(&cfg).unwrap();
    let c = std::rc::Rc::new(std::cell::RefCell::new(clock::Clock::default()));
    trainer.add_callback(clock::Recorder(c.clone()));
    let run =
        wick::train::RunDir::create(&cfg, &trainer.schema, Some(&tmp.path().join("run"))).unwrap();
    trainer.fit(&run, false).unwrap();
    let c = c.borrow();
    assert!(c.cached, "a frozen encoder caches its embeddings");
    let (e1, e2) = (c.epochs()[0], c.epochs()[1]);
    assert!(e2 <= 0.1 * e1, "epoch 2 took {e2:.2}s, epoch 1 {e1:.2}s");
    let f1 = summary(run.path.as_path())["best"]["value"]
        .as_f64()
        .unwrap();
    eprintln!("frozen MiniLM head: best eval_f1 {f1:.4}; epoch 1 {e1:.1}s, epoch 2 {e2:.3}s");
    assert!(f1 >= 0.93, "macro-F1 {f1}");
    // Only the classifier trained: the encoder's weights are the pretrained ones.
    let w = wick::model::read_safetensors(
        &weights(&run.path),
        &std::fs::read(weights(&run.path)).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let pre_path = minilm().unwrap().join("model.safetensors");
    let pre = wick::model::read_safetensors(
        &pre_path,
        &std::fs::read(&pre_path).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let name = "encoder.layer.5.output.dense.weight";
    let diff = (&w[name] - &pre[name])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "the frozen encoder changed");
}

/// `wick predict RUN --json` on an obvious spam and an obvious ham text: (stdout, stderr).
fn predict_spam_and_ham(run: &Path) -> (String, String) {
    let o = wick()
        .arg("predict")
        .arg(run)
        .args([
            "--json",
            "--text",
            "Congratulations! You have WON a FREE vacation. Click here to claim your cash prize now!!!",
            "--text",
            "Hi all, the build of the kernel module fails on Debian testing; patch attached. Thanks, Bob",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "wick predict {} failed: {err}",
        run.display()
    );
    (out, err)
}

#[test]
fn fine_tuning_minilm_classifies_spam_and_predicts_texts() {
    if minilm().is_none() || !spam() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = train("configs/spam_bert_ci.toml", &tmp.path().join("run"), &[]);
    let f1 = final_metric(&run, "eval_f1");
    eprintln!("fine-tuned MiniLM (CI size): eval_f1 {f1:.4}");
    assert!(f1 >= 0.95, "macro-F1 {f1}");
    let (out, err) = predict_spam_and_ham(&run);
    let labels: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["label"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(labels, ["spam", "ham"], "{out}");
    assert!(err.contains("ms per text"), "{err}");

    // int8: macro-F1 within half a point of f32 in under 30% of the file, and the quantized
    // run predicts the same labels.
    let o = wick()
        .arg("quantize")
        .arg(&run)
        .args(["--json", "--iters", "3"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "wick quantize failed:\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f1 = |side: &str| r[side]["metrics"]["f1"].as_f64().unwrap();
    let size = |side: &str| r[side]["file_bytes"].as_f64().unwrap();
    eprintln!(
        "MiniLM spam (CI size): f32 F1 {:.4}, int8 F1 {:.4}; file {:.1} MB -> {:.1} MB",
        f1("f32"),
        f1("int8"),
        size("f32") / 1e6,
        size("int8") / 1e6
    );
    assert!((f1("f32") - f1("int8")).abs() <= 0.005, "{r}");
    assert!(size("int8") <= 0.30 * size("f32"), "{r}");
    let (out, _) = predict_spam_and_ham(&run.join("int8"));
    assert!(
        out.contains("\"label\":\"spam\"") && out.contains("\"label\":\"ham\""),
        "{out}"
    );
    // A file of texts with invalid UTF-8 on line 2, and an empty --text.
    let bad = tmp.path().join("texts.txt");
    std::fs::write(&bad, b"fine text\nbad \xff byte\n").unwrap();
    let o = wick()
        .arg("predict")
        .arg(&run)
        .arg("--input")
        .arg(&bad)
        .output()
        .unwrap();
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("texts.txt: line 2: invalid UTF-8"),
        "{err}"
    );
    let o = wick()
        .arg("predict")
        .arg(&run)
        .args(["--text", " "])
        .output()
        .unwrap();
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("the text is empty"),
        "{err}"
    );
}

#[test]
fn a_hub_model_loads_from_the_local_hub_cache() {
    let Some(dir) = minilm() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The hub cache layout: models--OWNER--NAME/{refs/main, snapshots/<commit>/FILE}.
    let repo = tmp
        .path()
        .join("models--sentence-transformers--all-MiniLM-L6-v2");
    let commit = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::os::unix::fs::symlink(dir.join(f), snap.join(f)).unwrap();
    }
    // Only this test touches the hub variables in this test binary's process.
    std::env::set_var("HF_HUB_CACHE", tmp.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let enc =
        wick::model::bert::SentenceEncoder::load("hf:sentence-transformers/all-MiniLM-L6-v2", 128)
            .unwrap();
    let e = enc.embed(&["The cat sits outside"]).unwrap();
    assert!((e[0][0] - 0.13919106).abs() < 1e-5);
    let err = match wick::model::bert::SentenceEncoder::load("hf:nobody/missing-model", 128) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("found a model that is not cached"),
    };
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
}

#[test]
fn embed_prints_normalised_sentence_embeddings() {
    let Some(dir) = minilm() else { return };
    let o = wick()
        .arg("embed")
        .arg(&dir)
        .args([
            "--text",
            "The cat sits outside",
            "--text",
            "A man is eating food.",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let e: Vec<f64> = rows[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(e.len(), 384);
    assert!((e[0] - 0.13919106).abs() < 1e-5, "{}", e[0]);
}

#[test]
fn bad_bert_inputs_get_clear_errors() {
    let Some(dir) = minilm() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // A model directory without tokenizer.json.
    let no_tok = tmp.path().join("no_tok");
    std::fs::create_dir_all(&no_tok).unwrap();
    std::fs::copy(dir.join("config.json"), no_tok.join("config.json")).unwrap();
    std::os::unix::fs::symlink(
        dir.join("model.safetensors"),
        no_tok.join("model.safetensors"),
    )
    .unwrap();
    let err = match wick::model::bert::SentenceEncoder::load(no_tok.to_str().unwrap(), 128) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded without a tokenizer"),
    };
    assert!(err.contains("no_tok: missing tokenizer.json"), "{err}");
    // A config.json of another architecture.
    let gpt = tmp.path().join("gpt");
    std::fs::create_dir_all(&gpt).unwrap();
    std::fs::write(
        gpt.join("config.json"),
        r#"{"model_type": "gpt2", "n_layer": 12}"#,
    )
    .unwrap();
    std::fs::copy(dir.join("tokenizer.json"), gpt.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(dir.join("model.safetensors"), gpt.join("model.safetensors"))
        .unwrap();
    let err = match wick::model::bert::SentenceEncoder::load(gpt.to_str().unwrap(), 128) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded a GPT-2 config as BERT"),
    };
    assert!(
        err.contains("config.json: model_type = \"gpt2\"") && err.contains("needs a BERT encoder"),
        "{err}"
    );

    // Labelled texts: training shards with ham/spam, test shards with a third label.
    let jsonl = |name: &str, rows: &[(&str, &str)]| {
        let p = tmp.path().join(name);
        let body: String = rows
            .iter()
            .map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string() + "\n")
            .collect();
        std::fs::write(&p, body).unwrap();
        p
    };
    let pack = |src: &Path, out: &Path| {
        let o = wick()
            .args(["data", "pack", "text"])
            .arg(src)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
    };
    let train_src = jsonl(
        "train.jsonl",
        &[
            ("cheap pills", "spam"),
            ("lunch at noon?", "ham"),
            ("win money", "spam"),
            ("see you", "ham"),
        ],
    );
    let test_src = jsonl(
        "test.jsonl",
        &[("hello", "ham"), ("new phone who dis", "phishing")],
    );
    pack(&train_src, &tmp.path().join("train"));
    pack(&test_src, &tmp.path().join("test"));
    let cfg = tmp.path().join("bert.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\npath = {:?}\ntest_path = {:?}\n[model]\nkind = \"bert\"\npretrained = {:?}\n[train]\nepochs = 1\n",
            tmp.path().join("train"),
            tmp.path().join("test"),
            dir
        ),
    )
    .unwrap();
    let o = wick().arg("train").arg(&cfg).output().unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("label \"phishing\" was never seen in training") && err.contains("ham, spam"),
        "{err}"
    );
    // No pretrained encoder; an unknown freeze mode.
    std::fs::write(
        &cfg,
        format!(
            "[data]\npath = {:?}\n[model]\nkind = \"bert\"\n",
            tmp.path().join("train")
        ),
    )
    .unwrap();
    let err = text(&wick().arg("train").arg(&cfg).output().unwrap()).1;
    assert!(err.contains("needs `model.pretrained`"), "{err}");
    std::fs::write(
        &cfg,
        format!("[data]\npath = {:?}\n[model]\nkind = \"bert\"\npretrained = {:?}\nfreeze = \"backbone\"\n", tmp.path().join("train"), dir),
    )
    .unwrap();
    let err = text(&wick().arg("train").arg(&cfg).output().unwrap()).1;
    assert!(
        err.contains("`model.freeze` = \"backbone\"") && err.contains("\"encoder\""),
        "{err}"
    );
}

#[test]
fn a_pytorch_bin_checkpoint_with_the_bert_prefix_loads() {
    let Some(dir) = minilm() else { return };
    let Some(pypath) = python_with_safetensors() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), model.join(f)).unwrap();
    }
    // pytorch_model.bin as BertForSequenceClassification saves it: every name under `bert.`.
    let o = std::process::Command::new("python3")
        .env("PYTHONPATH", pypath)
        .arg(root().join("tests/fixtures/torchvision_state_dict.py"))
        .arg("--convert")
        .arg(dir.join("model.safetensors"))
        .arg(model.join("pytorch_model.bin"))
        .arg("bert.")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let enc = wick::model::bert::SentenceEncoder::load(model.to_str().unwrap(), 128).unwrap();
    let e = enc.embed(&["The cat sits outside"]).unwrap();
    assert!((e[0][0] - 0.13919106).abs() < 1e-5, "{}", e[0][0]);
}
