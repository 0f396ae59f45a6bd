//! A run interrupted at any step and resumed ends with weights byte-identical to the same run
//! uninterrupted.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

fn files_equal(a: &Path, b: &Path) {
    assert_eq!(
        sha256(&weights(a)),
        sha256(&weights(b)),
        "final weights differ"
    );
    assert_eq!(
        sha256(&a.join("checkpoints/last/optimizer.safetensors")),
        sha256(&b.join("checkpoints/last/optimizer.safetensors")),
        "optimizer state differs"
    );
    assert_eq!(
        std::fs::read_to_string(a.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(b.join("metrics.jsonl")).unwrap(),
        "metrics differ"
    );
}

fn resume(run: &Path) {
    let o = wick()
        .args(["train", "--quiet", "--resume"])
        .arg(run)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "resume failed:\n{out}\n{err}");
    assert_eq!(out.lines().last().map(Path::new), Some(run));
}

#[test]
fn stopped_mid_epoch_and_resumed_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    // Dropout, accumulation, warm-up + cosine: every piece of state must survive the resume.
    let common_args = [
        "--set",
        "train.epochs=4",
        "--set",
        "model.dropout=0.2",
        "--set",
        "train.accumulate=2",
        "--set",
        "schedule.kind=\"cosine\"",
        "--set",
        "schedule.warmup_steps=5",
        "--set",
        "train.checkpoint_every=4",
    ];
    let full = train(
        "configs/digits_mlp.toml",
        &tmp.path().join("full"),
        &common_args,
    );

    // 12 steps per epoch; abort at step 19 (mid-epoch 2). The last checkpoint is step 16.
    let cut = tmp.path().join("cut");
    let o = wick()
        .args(["train", "configs/digits_mlp.toml", "--quiet", "--run-dir"])
        .arg(&cut)
        .args(common_args)
        .args(["--abort-after-steps", "19"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success(), "the aborted run must fail");
    assert!(err.contains("aborted after step 19"), "{err}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cut.join("checkpoints/last/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 16);
    assert_eq!(state["epoch"], 1, "mid-epoch checkpoint");
    assert_eq!(state["batch"], 8);
    resume(&cut);
    files_equal(&full, &cut);
}

#[test]
fn killed_with_sigkill_and_resumed_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--threads",
        "1",
        "--set",
        "train.epochs=30",
        "--set",
        "train.checkpoint_every=1",
    ];
    let full = train("configs/digits_mlp.toml", &tmp.path().join("full"), &args);

    let cut = tmp.path().join("cut");
    let mut child = wick()
        .args(["train", "configs/digits_mlp.toml", "--quiet", "--run-dir"])
        .arg(&cut)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it somewhere after the first few checkpoints, wherever it is: writing a
    // checkpoint, mid-step or evaluating.
    let state = cut.join("checkpoints/last/trainer.json");
    let t0 = Instant::now();
    loop {
        let step = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0);
        if step >= 37 {
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            panic!("the run finished before it could be killed");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "run made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    resume(&cut);
    files_equal(&full, &cut);
}

#[test]
fn save_every_keeps_last_at_its_epochs_and_resumes_from_there() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--set", "train.epochs=5", "--set", "train.save_every=2"];
    let full = train("configs/digits_mlp.toml", &tmp.path().join("full"), &args);
    let steps = summary(&full)["steps"].as_u64().unwrap();
    assert_eq!(steps % 5, 0);
    let per_epoch = steps / 5;
    // Stop one step into epoch 5: `last` was saved after epochs 2 and 4, not 3.
    let cut = tmp.path().join("cut");
    let o = wick()
        .args(["train", "configs/digits_mlp.toml", "--quiet", "--run-dir"])
        .arg(&cut)
        .args(args)
        .args(["--abort-after-steps", &(4 * per_epoch + 1).to_string()])
        .output()
        .unwrap();
    assert!(!o.status.success(), "the aborted run must fail");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cut.join("checkpoints/last/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["epoch"], 4, "last is the epoch-4 checkpoint");
    assert_eq!(state["step"], 4 * per_epoch);
    resume(&cut);
    files_equal(&full, &cut);
}
