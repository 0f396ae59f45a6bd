//! Crash-safe checkpoints.
//!
//! A checkpoint is a directory — `checkpoints/last` or `checkpoints/best` inside the run
//! directory — holding `model.safetensors` (PyTorch-style names, readable by
//! `safetensors.torch.load_file`), `optimizer.safetensors` and `trainer.json`. It is written
//! in full to a temporary directory (each file fsynced) and then swapped in by renames, so a
//! crash at any point leaves either the old or the new checkpoint whole.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::io::{sync_dir, write_synced};
use crate::model::{read_safetensors, tensors_to_safetensors, Param, ParamStore};
use crate::train::optim::Optimizer;
use crate::{Error, Result};

/// The best evaluation so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub metric: String,
    pub value: f64,
    pub epoch: usize,
    pub step: u64,
}

/// Where the loop stands: everything besides weights and optimizer moments that a resumed
/// run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    pub wick_version: String,
    pub config_hash: String,
    /// xxh3 of the run's `config.toml`; a resume requires it unchanged.
    pub config_file: String,
    pub seed: u64,
    /// Epochs completed; the epoch in progress is this (0-based).
    pub epoch: usize,
    /// Next micro-batch of the epoch in progress.
    pub batch: usize,
    /// Optimizer steps done.
    pub step: u64,
    /// Training samples processed.
    pub samples: u64,
    /// Sum and count of micro-batch losses in the epoch in progress.
    pub epoch_loss_sum: f64,
    pub epoch_batches: u64,
    pub best: Option<Best>,
    /// Evaluations since the last improvement (early stopping).
    pub bad_evals: usize,
    pub stopped_early: bool,
    /// Seconds spent in training steps (for throughput).
    pub train_time_s: f64,
}

impl TrainerState {
    pub fn new(config_hash: &str, config_file: &str, seed: u64) -> Self {
        Self {
            format: 1,
            wick_version: crate::VERSION.into(),
            config_hash: config_hash.into(),
            config_file: config_file.into(),
            seed,
            epoch: 0,
            batch: 0,
            step: 0,
            samples: 0,
            epoch_loss_sum: 0.0,
            epoch_batches: 0,
            best: None,
            bad_evals: 0,
            stopped_early: false,
            train_time_s: 0.0,
        }
    }
}

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer.json";

/// Writes a checkpoint directory `dir` atomically.
pub fn save(
    dir: &Path,
    store: &ParamStore,
    params: &[Param],
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<()> {
    Snapshot::capture(store, params, opt, state)?.write(dir)
}

/// A checkpoint's three files, serialized in memory: what training state was at one moment,
/// ready to be written while training goes on.
pub struct Snapshot {
    model: Vec<u8>,
    optim: Vec<u8>,
    state: Vec<u8>,
}

impl Snapshot {
    /// Serializes the weights, the optimizer state and the trainer state as they are now.
    pub fn capture(
        store: &ParamStore,
        params: &[Param],
        opt: &Optimizer,
        state: &TrainerState,
    ) -> Result<Self> {
        Ok(Self {
            model: store.to_safetensors()?,
            optim: tensors_to_safetensors(&opt.state_tensors(params)?)?,
            state: serde_json::to_string_pretty(state)
                .expect("state serializes")
                .into_bytes(),
        })
    }

    /// Writes the checkpoint directory `dir` atomically: in full to a temporary directory
    /// (each file fsynced), then swapped in by renames.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_like(dir, None)
    }

    /// Writes the snapshot to every directory of `dirs`, each atomically. The first gets the
    /// files; the others, where the file system allows, hard links to them (the same bytes,
    /// already on disk), so that a save to both `best` and `last` writes and fsyncs the data
    /// once.
    pub fn write_all(&self, dirs: &[PathBuf]) -> Result<()> {
        let mut first: Option<&Path> = None;
        for dir in dirs {
            self.write_like(dir, first)?;
            first.get_or_insert(dir);
        }
        Ok(())
    }

    /// As [`Snapshot::write`]; `like` is a directory this snapshot was already written to,
    /// whose files are linked instead of written again where that works.
    fn write_like(&self, dir: &Path, like: Option<&Path>) -> Result<()> {
        let parent = dir
            .parent()
            .ok_or_else(|| Error::Checkpoint(format!("{}: no parent directory", dir.display())))?;
        if !parent.exists() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            if let Some(run) = parent.parent() {
                sync_dir(run)?;
            }
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tmp = parent.join(format!(".{name}.tmp"));
        let old = parent.join(format!(".{name}.old"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // The temporary directory becomes the checkpoint only by the rename below, so its
        // files need no atomic writes of their own: each is fsynced, then the directory once.
        for (file, bytes) in [
            (MODEL_FILE, &self.model),
            (OPTIM_FILE, &self.optim),
            (STATE_FILE, &self.state),
        ] {
            let path = tmp.join(file);
            let linked = like.is_some_and(|l| fs::hard_link(l.join(file), &path).is_ok());
            if !linked {
                write_synced(&path, bytes)?;
            }
        }
        sync_dir(&tmp)?;
        if dir.exists() {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        sync_dir(parent)?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }
}

/// Writes checkpoints on a background thread, as PyTorch's `async_save` does, so that the
/// files and fsyncs (milliseconds for a small model, a second or more for a large one) do not
/// stall training, nor, under data parallelism, the ranks that wait for rank 0 at the next
/// all-reduce. The state is captured before [`Checkpointer::save`] returns, so training may
/// change the weights at once. At most one write is in flight: the next save, or
/// [`Checkpointer::finish`], waits for it and reports its error. Each write is atomic, so a
/// crash during one leaves the previous checkpoint whole.
#[derive(Default)]
pub struct Checkpointer {
    pending: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Checkpointer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Captures the state now and writes it to every directory of `dirs` in the background.
    pub fn save(
        &mut self,
        dirs: &[PathBuf],
        store: &ParamStore,
        params: &[Param],
        opt: &Optimizer,
        state: &TrainerState,
    ) -> Result<()> {
        let snap = Snapshot::capture(store, params, opt, state)?;
        self.finish()?;
        let dirs = dirs.to_vec();
        self.pending = Some(std::thread::spawn(move || snap.write_all(&dirs)));
        Ok(())
    }

    /// Waits for the write in flight, if any, and returns its result.
    pub fn finish(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(Error::Checkpoint(
                    "the checkpoint writer thread panicked".into(),
                ))
            }),
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // A run that ends with an error still leaves its last checkpoint on disk.
        let _ = self.finish();
    }
}

/// The checkpoint directory to read for `dir`: `dir` itself, or the previous version left by a
/// crash in the middle of the swap.
pub fn locate(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let old = dir.with_file_name(format!(".{name}.old"));
    if old.join(STATE_FILE).is_file() {
        return Ok(old);
    }
    Err(Error::Checkpoint(format!(
        "{}: no checkpoint here (expected {STATE_FILE}); the run may not have finished an epoch yet, start it again without --resume",
        dir.display()
    )))
}

/// The checkpoint directory `which` (`best` or `last`) of the run in `run_dir`, falling back to
/// `last` when there is no `best` yet.
pub fn locate_in_run(run_dir: &Path, which: &str) -> Result<PathBuf> {
    let dir = run_dir.join("checkpoints");
    locate(&dir.join(which)).or_else(|_| locate(&dir.join("last")))
}

/// Reads the trainer state of a checkpoint directory.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: invalid trainer state: {e}", path.display())))
}

/// Loads a checkpoint into the model and optimizer and returns the trainer state.
pub fn load(
    dir: &Path,
    store: &ParamStore,
    params: &[Param],
    opt: &mut Optimizer,
) -> Result<TrainerState> {
    let dir = locate(dir)?;
    let state = read_state(&dir)?;
    store.load_safetensors(&dir.join(MODEL_FILE))?;
    let path = dir.join(OPTIM_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let tensors = read_safetensors(&path, &bytes, &candle_core::Device::Cpu)?;
    opt.load_state(params, &tensors)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptimConfig;

    /// A store with one 3-value weight, its optimizer, and a trainer state.
    fn setup() -> (ParamStore, Vec<Param>, Optimizer, TrainerState) {
        let store = ParamStore::new(7);
        store
            .var_builder()
            .get_with_hints(3, "w", candle_nn::Init::Const(1.5))
            .unwrap();
        let params = store.trainable();
        let opt = Optimizer::new(&OptimConfig::default(), &params);
        (store, params, opt, TrainerState::new("h", "f", 7))
    }

    #[test]
    fn background_saves_capture_the_state_when_called() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, params, opt, mut st) = setup();
        st.step = 3;
        let dirs = [tmp.path().join("best"), tmp.path().join("last")];
        let mut ck = Checkpointer::new();
        ck.save(&dirs, &store, &params, &opt, &st).unwrap();
        // Training goes on while the write is in flight.
        params[0]
            .var
            .set(&candle_core::Tensor::new(&[9f32, 9.0, 9.0], &candle_core::Device::Cpu).unwrap())
            .unwrap();
        ck.finish().unwrap();
        for d in &dirs {
            let (store2, params2, mut opt2, _) = setup();
            params2[0]
                .var
                .set(&candle_core::Tensor::new(&[0f32; 3], &candle_core::Device::Cpu).unwrap())
                .unwrap();
            let got = load(d, &store2, &params2, &mut opt2).unwrap();
            assert_eq!(got.step, 3);
            assert_eq!(params2[0].var.to_vec1::<f32>().unwrap(), vec![1.5; 3]);
        }
    }

    /// A save to `best` and `last` writes the files once and links them into the second
    /// directory; a later save to `last` alone replaces its files and leaves `best` as it was.
    #[test]
    fn a_save_to_two_directories_links_the_second_and_later_saves_leave_it_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, params, opt, mut st) = setup();
        let best = tmp.path().join("best");
        let last = tmp.path().join("last");
        st.step = 1;
        let mut ck = Checkpointer::new();
        ck.save(&[best.clone(), last.clone()], &store, &params, &opt, &st)
            .unwrap();
        ck.finish().unwrap();
        #[cfg(unix)]
        for f in [MODEL_FILE, OPTIM_FILE, STATE_FILE] {
            use std::os::unix::fs::MetadataExt;
            let ino = |d: &Path| fs::metadata(d.join(f)).unwrap().ino();
            assert_eq!(ino(&best), ino(&last), "{f} is linked, not written twice");
        }
        let best_bytes = fs::read(best.join(MODEL_FILE)).unwrap();
        params[0]
            .var
            .set(&candle_core::Tensor::new(&[4f32, 5.0, 6.0], &candle_core::Device::Cpu).unwrap())
            .unwrap();
        st.step = 2;
        ck.save(std::slice::from_ref(&last), &store, &params, &opt, &st)
            .unwrap();
        ck.finish().unwrap();
        assert_eq!(fs::read(best.join(MODEL_FILE)).unwrap(), best_bytes);
        assert_eq!(read_state(&best).unwrap().step, 1);
        assert_eq!(read_state(&last).unwrap().step, 2);
        let (store2, params2, mut opt2, _) = setup();
        load(&last, &store2, &params2, &mut opt2).unwrap();
        assert_eq!(
            params2[0].var.to_vec1::<f32>().unwrap(),
            vec![4.0, 5.0, 6.0]
        );
        // No temporary or previous directories are left behind.
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["best", "last"]);
    }

    #[test]
    fn a_failed_background_write_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        // The checkpoint's parent is a file: the write must fail, and say where.
        let blocker = tmp.path().join("checkpoints");
        std::fs::write(&blocker, b"not a directory").unwrap();
        let (store, params, opt, st) = setup();
        let mut ck = Checkpointer::new();
        ck.save(&[blocker.join("last")], &store, &params, &opt, &st)
            .unwrap();
        let err = ck.finish().unwrap_err().to_string();
        assert!(err.contains("checkpoints"), "{err}");
        // The error is reported once; the writer is then idle.
        ck.finish().unwrap();
    }
}
