//! The run directory: `checkpoints/runs/<name>-<timestamp>/` with the resolved config, the
//! dataset schema, metrics, checkpoints, the curve plot and the summary.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::data::Schema;
use crate::io::write_atomic;
use crate::train::checkpoint::Best;
use crate::train::metrics::Metrics;
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "config.toml";
pub const SCHEMA_FILE: &str = "dataset.json";
pub const METRICS_JSONL: &str = "metrics.jsonl";
pub const METRICS_CSV: &str = "metrics.csv";
pub const CURVES_PNG: &str = "curves.png";
pub const SUMMARY_FILE: &str = "summary.json";

/// A run directory on disk.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

/// `summary.json`: the outcome of a run and what produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub wick_version: String,
    pub config_hash: String,
    pub seed: u64,
    pub model: String,
    pub num_params: usize,
    pub epochs_completed: usize,
    pub steps: u64,
    pub stopped_early: bool,
    /// Metrics of the last evaluation.
    pub final_metrics: Metrics,
    pub best: Option<Best>,
    /// Wall time of the last `wick train` invocation (seconds).
    pub wall_time_s: f64,
    /// Time spent in training steps over the whole run, resumes included.
    pub train_time_s: f64,
    pub train_samples_per_s: f64,
    /// Of the training time of this invocation, the seconds rank 0 spent in data-parallel
    /// communication (gradient all-reduce, agreeing on stops); 0 for one process.
    #[serde(default)]
    pub comm_time_s: f64,
}

impl RunDir {
    /// Creates `<output_dir>/<name>-<UTC timestamp>` (or `explicit`) and writes the resolved
    /// config and the dataset schema into it.
    pub fn create(cfg: &Config, schema: &Schema, explicit: Option<&Path>) -> Result<Self> {
        let path = match explicit {
            Some(p) => {
                if p.join(CONFIG_FILE).exists() {
                    return Err(Error::Checkpoint(format!(
                        "{}: already holds a run; pass --resume {} to continue it, or choose another --run-dir",
                        p.display(),
                        p.display()
                    )));
                }
                fs::create_dir_all(p).map_err(|e| {
                    Error::Checkpoint(format!(
                        "{}: cannot create the run directory ({e}); choose another --run-dir",
                        p.display()
                    ))
                })?;
                p.to_path_buf()
            }
            None => {
                let out = &cfg.run.output_dir;
                fs::create_dir_all(out).map_err(|e| {
                    Error::Checkpoint(format!(
                        "{}: cannot create run.output_dir ({e}); set run.output_dir to a writable directory, or pass --run-dir",
                        out.display()
                    ))
                })?;
                let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
                let base = format!("{}-{stamp}", cfg.run.name);
                // `create_dir` fails if the directory exists, so two runs started in the same
                // second never share one.
                let mut i = 0;
                loop {
                    let name = if i == 0 {
                        base.clone()
                    } else {
                        format!("{base}-{i}")
                    };
                    let p = out.join(name);
                    match fs::create_dir(&p) {
                        Ok(()) => break p,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => i += 1,
                        Err(e) => return Err(Error::io(&p, e)),
                    }
                }
            }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::io::sync_dir(parent)?;
        }
        let header = format!(
            "# Resolved by wick {} (config hash {}). `wick train --resume <this directory>` continues the run.\n",
            crate::VERSION,
            cfg.hash(),
        );
        write_atomic(
            &path.join(CONFIG_FILE),
            format!("{header}{}", cfg.to_toml()).as_bytes(),
        )?;
        let schema_json = serde_json::to_string_pretty(schema).expect("schema serializes");
        write_atomic(&path.join(SCHEMA_FILE), schema_json.as_bytes())?;
        Ok(Self { path })
    }

    /// Opens an existing run directory.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join(CONFIG_FILE).is_file() {
            return Err(Error::Checkpoint(format!(
                "{}: not a wick run directory (no {CONFIG_FILE}); `wick runs` lists the runs",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// A handle on `path` that checks nothing: what the other ranks of a data-parallel run
    /// hold, since only rank 0 writes (and may be the only one to see) the directory.
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The run's resolved config, validated again (it may have been edited by hand).
    pub fn config(&self) -> Result<Config> {
        crate::config::load(&self.path.join(CONFIG_FILE), &[])
    }

    /// xxh3 of `config.toml` as written: a resumed run must find it unchanged.
    pub fn config_file_hash(&self) -> Result<String> {
        let p = self.path.join(CONFIG_FILE);
        let bytes = fs::read(&p).map_err(|e| Error::io(&p, e))?;
        Ok(crate::data::shard::checksum(&bytes))
    }

    /// Takes the run's lock: one process at a time trains in a run directory. The lock is
    /// held until the returned file is dropped (or the process dies).
    pub fn lock(&self) -> Result<fs::File> {
        let p = self.path.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        f.try_lock().map_err(|_| {
            Error::Checkpoint(format!(
                "{}: another wick process is training in this run directory; wait for it to finish or stop it",
                self.path.display()
            ))
        })?;
        Ok(f)
    }

    pub fn schema(&self) -> Result<Schema> {
        let p = self.path.join(SCHEMA_FILE);
        let text = fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint(format!("{}: invalid schema: {e}", p.display())))
    }

    pub fn checkpoint(&self, which: &str) -> PathBuf {
        self.path.join("checkpoints").join(which)
    }

    pub fn summary(&self) -> Result<Summary> {
        let p = self.path.join(SUMMARY_FILE);
        let text = fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint(format!("{}: invalid summary: {e}", p.display())))
    }

    pub fn write_summary(&self, s: &Summary) -> Result<()> {
        let json = serde_json::to_string_pretty(s).expect("summary serializes");
        write_atomic(&self.path.join(SUMMARY_FILE), json.as_bytes())
    }

    /// The rows of `metrics.jsonl`.
    pub fn metrics(&self) -> Result<Vec<Metrics>> {
        let p = self.path.join(METRICS_JSONL);
        if !p.exists() {
            return Ok(Vec::new());
        }
        let text = fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    Error::Checkpoint(format!(
                        "{}:{}: invalid JSON ({e}); delete the line to continue",
                        p.display(),
                        i + 1
                    ))
                })
            })
            .collect()
    }

    /// Appends one metrics row, rewriting `metrics.jsonl` and `metrics.csv` atomically (the files
    /// are small), so a crash never leaves a torn line.
    pub fn append_metrics(&self, row: &Metrics) -> Result<()> {
        let mut rows = self.metrics()?;
        rows.push(row.clone());
        self.write_metrics(&rows)
    }

    fn write_metrics(&self, rows: &[Metrics]) -> Result<()> {
        let text: String = rows
            .iter()
            .map(|r| serde_json::to_string(r).expect("metrics serialize") + "\n")
            .collect();
        write_atomic(&self.path.join(METRICS_JSONL), text.as_bytes())?;
        self.write_metrics_csv(rows)
    }

    /// Keeps only the metric rows of the first `epochs` epochs (used when resuming, so that
    /// rows written after the checkpoint are not duplicated).
    pub fn truncate_metrics(&self, epochs: usize) -> Result<()> {
        let rows: Vec<Metrics> = self
            .metrics()?
            .into_iter()
            .filter(|m| m.get("epoch").copied().unwrap_or(0.0) <= epochs as f64)
            .collect();
        self.write_metrics(&rows)
    }

    /// Rewrites `metrics.csv` from metric rows (columns: the union of keys, `epoch` first).
    pub fn write_metrics_csv(&self, rows: &[Metrics]) -> Result<()> {
        let mut cols: Vec<String> = Vec::new();
        for r in rows {
            for k in r.keys() {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
        cols.sort_by_key(|c| match c.as_str() {
            "epoch" => (0, c.clone()),
            "step" => (1, c.clone()),
            _ => (2, c.clone()),
        });
        let mut out = cols.join(",") + "\n";
        for r in rows {
            let line: Vec<String> = cols
                .iter()
                .map(|c| r.get(c).map(|v| format!("{v}")).unwrap_or_default())
                .collect();
            out += &(line.join(",") + "\n");
        }
        write_atomic(&self.path.join(METRICS_CSV), out.as_bytes())
    }
}
