//! The study journal: an append-only JSON-lines file, one fsynced record per event, shared by
//! worker processes through an exclusive file lock (like Optuna's `JournalStorage`). Replaying
//! it rebuilds every trial.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::space::Distribution;
use super::study::{FrozenTrial, TrialState};
use crate::{Error, Result};

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Record {
    /// A trial started with these parameters (internal representation).
    Start {
        trial: usize,
        params: BTreeMap<String, f64>,
        distributions: BTreeMap<String, Distribution>,
        worker: u32,
    },
    /// An intermediate value (e.g. an epoch's metric).
    Report { trial: usize, step: u64, value: f64 },
    /// A successive-halving rung passed.
    Rung { trial: usize, rung: u32, value: f64 },
    /// The trial ended.
    Finish {
        trial: usize,
        state: TrialState,
        value: Option<f64>,
        duration_s: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
}

/// An open journal file.
pub struct Journal {
    pub path: PathBuf,
    file: File,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Runs `f` holding the journal's exclusive lock, with every record so far; records that
    /// `f` returns are appended (and fsynced) before the lock is released.
    pub fn transact<R>(
        &mut self,
        f: impl FnOnce(&[Record]) -> Result<(R, Vec<Record>)>,
    ) -> Result<R> {
        self.file.lock().map_err(|e| Error::io(&self.path, e))?;
        let out = (|| {
            let records = self.read_all()?;
            let (r, new) = f(&records)?;
            if !new.is_empty() {
                let mut buf = String::new();
                for rec in &new {
                    buf += &serde_json::to_string(rec).expect("records serialize");
                    buf.push('\n');
                }
                self.file
                    .write_all(buf.as_bytes())
                    .and_then(|_| self.file.sync_data())
                    .map_err(|e| Error::io(&self.path, e))?;
            }
            Ok(r)
        })();
        let _ = self.file.unlock();
        out
    }

    /// Every record; a torn last line (a crash mid-write) is ignored.
    pub fn read_all(&mut self) -> Result<Vec<Record>> {
        let mut text = String::new();
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_to_string(&mut text))
            .map_err(|e| Error::io(&self.path, e))?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut out = Vec::with_capacity(lines.len());
        for (i, l) in lines.iter().enumerate() {
            match serde_json::from_str(l) {
                Ok(r) => out.push(r),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => {
                    return Err(Error::Data(format!(
                        "{}:{}: not a study record ({e}); the journal is corrupt",
                        self.path.display(),
                        i + 1
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// Rebuilds the trials from records.
pub fn replay(records: &[Record]) -> Vec<FrozenTrial> {
    let mut trials: Vec<FrozenTrial> = Vec::new();
    for r in records {
        match r {
            Record::Start {
                trial,
                params,
                distributions,
                ..
            } => {
                if *trial == trials.len() {
                    trials.push(FrozenTrial {
                        number: *trial,
                        state: TrialState::Running,
                        value: None,
                        params: params.clone(),
                        distributions: distributions.clone(),
                        intermediate: BTreeMap::new(),
                        rungs: BTreeMap::new(),
                        duration_s: 0.0,
                        note: None,
                    });
                }
            }
            Record::Report { trial, step, value } => {
                if let Some(t) = trials.get_mut(*trial) {
                    t.intermediate.insert(*step, *value);
                }
            }
            Record::Rung { trial, rung, value } => {
                if let Some(t) = trials.get_mut(*trial) {
                    t.rungs.insert(*rung, *value);
                }
            }
            Record::Finish {
                trial,
                state,
                value,
                duration_s,
                note,
            } => {
                if let Some(t) = trials.get_mut(*trial) {
                    if t.state == TrialState::Running {
                        t.state = *state;
                        t.value = *value;
                        t.duration_s = *duration_s;
                        t.note = note.clone();
                    }
                }
            }
        }
    }
    trials
}
