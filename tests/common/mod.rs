//! Helpers shared by the integration tests: run the `wick` binary, read run directories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// The repository root (tests run the binary from here so relative data paths resolve).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn wick() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wick"));
    c.current_dir(root());
    c.env_remove("RAYON_NUM_THREADS");
    c
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// Runs `wick train CONFIG --run-dir DIR ARGS…` quietly and returns DIR; panics with the
/// output if it fails.
pub fn train(config: &str, run_dir: &Path, args: &[&str]) -> PathBuf {
    let o = wick()
        .args(["train", config, "--quiet", "--run-dir"])
        .arg(run_dir)
        .args(args)
        .output()
        .expect("run wick");
    let (out, err) = text(&o);
    assert!(o.status.success(), "wick train failed:\n{out}\n{err}");
    let last = out.lines().last().unwrap_or_default();
    assert_eq!(Path::new(last), run_dir, "last stdout line is the run dir");
    run_dir.to_path_buf()
}

pub fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn summary(run: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(run.join("summary.json")).expect("summary.json");
    serde_json::from_str(&s).unwrap()
}

pub fn final_metric(run: &Path, key: &str) -> f64 {
    summary(run)["final_metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in summary"))
}

pub fn weights(run: &Path) -> PathBuf {
    run.join("checkpoints/last/model.safetensors")
}

/// In CI (`CI=true`) a missing test asset is a failure, elsewhere a loud skip.
pub fn require_asset(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("test asset missing in CI: {what}; scripts/test.sh fetches it");
    }
    eprintln!("SKIPPED: {what} is missing; run scripts/test.sh to fetch it");
    false
}

/// The `.cache/python` path, if python3 there can import safetensors and numpy (the asset rule
/// of [`require_asset`] applies).
pub fn python_with_safetensors() -> Option<PathBuf> {
    let pypath = root().join(".cache/python");
    let have = Command::new("python3")
        .env("PYTHONPATH", &pypath)
        .args(["-c", "import safetensors.numpy, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    require_asset(have, "python packages safetensors + numpy in .cache/python").then_some(pypath)
}

/// A training callback that records whether features were cached and each epoch's duration.
pub mod clock {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Instant;
    use wick::train::callback::{Callback, Control, EpochEnd, FitStart};

    #[derive(Default)]
    pub struct Clock {
        pub cached: bool,
        start: Option<Instant>,
        ends: Vec<f64>,
        /// `eval_accuracy` after each epoch that was evaluated.
        pub accuracy: Vec<f64>,
    }

    impl Clock {
        /// Seconds each epoch took (epoch 1 includes any feature caching).
        pub fn epochs(&self) -> Vec<f64> {
            let mut prev = 0.0;
            self.ends
                .iter()
                .map(|&t| {
                    let d = t - prev;
                    prev = t;
                    d
                })
                .collect()
        }
    }

    /// Add `Recorder(clock.clone())` to a trainer; read `clock` after `fit`.
    pub struct Recorder(pub Rc<RefCell<Clock>>);

    impl Callback for Recorder {
        fn on_fit_start(&mut self, info: &FitStart) -> wick::Result<()> {
            let mut c = self.0.borrow_mut();
            c.cached = info.cached_features;
            c.start = Some(Instant::now());
            Ok(())
        }

        fn on_epoch_end(&mut self, e: &EpochEnd) -> wick::Result<Control> {
            let mut c = self.0.borrow_mut();
            let t = c.start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
            c.ends.push(t);
            if let Some(&a) = e.metrics.get("eval_accuracy") {
                c.accuracy.push(a);
            }
            Ok(Control::Continue)
        }
    }
}
