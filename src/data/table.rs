//! Tabular data from CSV: a header row, numeric feature columns and a label column.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, Task};
use crate::rng::Rng;
use crate::{Error, Result};

/// Largest number of distinct integer labels that `task = "auto"` still treats as classes.
pub const AUTO_MAX_CLASSES: usize = 50;

/// Everything needed to turn a raw row into model input and a prediction back into a label.
/// Saved as `dataset.json` in every run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    pub features: Vec<String>,
    /// Number of model inputs (for CSV, the number of features).
    #[serde(default)]
    pub input_dim: usize,
    /// What a sample is: `tabular` (a feature vector), `image` or `text` (token ids).
    #[serde(default = "tabular")]
    pub modality: String,
    /// Fingerprint (xxh3) of the data files the run was trained on; eval and resume refuse
    /// data that changed.
    #[serde(default)]
    pub data_hash: String,
    pub label: String,
    /// `Classification` or `Regression` (never `Auto` once resolved).
    pub task: Task,
    /// Class names in index order (classification only).
    pub classes: Vec<String>,
    /// Per-feature mean and standard deviation applied before the model (identity when
    /// standardization is off).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Per-sample shape of the input when it has one (`[c, h, w]` for images, the shard
    /// field's shape for tensors); empty for plain feature vectors.
    #[serde(default)]
    pub input_shape: Vec<usize>,
}

impl Schema {
    /// Number of model outputs: classes, or 1 for regression.
    pub fn outputs(&self) -> usize {
        match self.task {
            Task::Classification => self.classes.len(),
            _ => 1,
        }
    }
}

fn tabular() -> String {
    "tabular".into()
}

/// Targets of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices into [`Schema::classes`].
    Classes(Vec<u32>),
    /// Regression targets.
    Values(Vec<f32>),
}

/// Rows of features (row-major, `n × d`) and their targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub x: Vec<f32>,
    pub n: usize,
    pub d: usize,
    pub y: Targets,
}

impl Dataset {
    fn select(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * self.d);
        for &i in idx {
            x.extend_from_slice(&self.x[i * self.d..(i + 1) * self.d]);
        }
        let y = match &self.y {
            Targets::Classes(c) => Targets::Classes(idx.iter().map(|&i| c[i]).collect()),
            Targets::Values(v) => Targets::Values(idx.iter().map(|&i| v[i]).collect()),
        };
        Dataset {
            x,
            n: idx.len(),
            d: self.d,
            y,
        }
    }

    /// Applies `(x - mean) / std` in place.
    pub fn standardize(&mut self, schema: &Schema) {
        for row in self.x.chunks_exact_mut(self.d) {
            for ((v, m), s) in row.iter_mut().zip(&schema.mean).zip(&schema.std) {
                *v = (*v - m) / s;
            }
        }
    }
}

/// A raw CSV table: header, feature matrix and the label column as text.
struct RawTable {
    features: Vec<String>,
    x: Vec<f32>,
    labels: Option<Vec<String>>,
    /// 1-based CSV line of each row, for error messages.
    lines: Vec<u64>,
}

fn data_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: {msg}", path.display()))
}

/// Reads a CSV table. With `features = Some(..)`, those columns are read in that order (a
/// prediction input); otherwise every column except `label` is a feature. The label column
/// must exist when `label_required`.
fn read_csv(
    path: &Path,
    label: &str,
    features: Option<&[String]>,
    drop: &[String],
    label_required: bool,
) -> Result<RawTable> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| data_err(path, format!("cannot open: {e}")))?;
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| data_err(path, format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.is_empty() || header.iter().all(|h| h.is_empty()) {
        return Err(data_err(
            path,
            "the file is empty; expected a header row and at least one data row",
        ));
    }
    let mut sorted: Vec<&String> = header.iter().collect();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(data_err(
            path,
            format!(
                "the header names column `{}` twice; column names must be unique",
                w[0]
            ),
        ));
    }
    let label_col = header.iter().position(|h| h == label);
    if label_col.is_none() && label_required {
        let hint = crate::config::closest_name(label, &header)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        return Err(data_err(
            path,
            format!(
                "no label column `{label}` (data.label); the columns are {}{hint}",
                header.join(", ")
            ),
        ));
    }
    let (names, cols): (Vec<String>, Vec<usize>) = match features {
        Some(want) => {
            let mut cols = Vec::with_capacity(want.len());
            for f in want {
                let c = header.iter().position(|h| h == f).ok_or_else(|| {
                    data_err(
                        path,
                        format!("missing feature column `{f}` that the model was trained on"),
                    )
                })?;
                cols.push(c);
            }
            (want.to_vec(), cols)
        }
        None => {
            if let Some(d) = drop.iter().find(|d| !header.contains(d)) {
                return Err(data_err(
                    path,
                    format!(
                        "data.drop names `{d}`, which is not a column; the columns are {}",
                        header.join(", ")
                    ),
                ));
            }
            header
                .iter()
                .enumerate()
                .filter(|(i, h)| Some(*i) != label_col && !drop.contains(h))
                .map(|(i, h)| (h.clone(), i))
                .unzip()
        }
    };
    if names.is_empty() {
        return Err(data_err(path, "no feature columns besides the label"));
    }
    let mut x = Vec::new();
    let mut labels = label_col.map(|_| Vec::new());
    let mut lines = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| data_err(path, format!("malformed CSV: {e}")))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        if rec.len() != header.len() {
            return Err(data_err(
                path,
                format!(
                    "line {line}: {} fields, but the header has {}",
                    rec.len(),
                    header.len()
                ),
            ));
        }
        for (&c, name) in cols.iter().zip(&names) {
            let s = &rec[c];
            let v: f32 = s.parse().map_err(|_| {
                data_err(
                    path,
                    format!(
                        "line {line}, column `{name}`: expected a number, got \"{s}\"; non-numeric feature columns are not supported yet, drop or encode them"
                    ),
                )
            })?;
            if !v.is_finite() {
                return Err(data_err(
                    path,
                    format!("line {line}, column `{name}`: the value {s} is not finite"),
                ));
            }
            x.push(v);
        }
        if let (Some(lc), Some(labels)) = (label_col, labels.as_mut()) {
            let s = &rec[lc];
            if s.is_empty() {
                return Err(data_err(
                    path,
                    format!("line {line}: the label column `{label}` is empty"),
                ));
            }
            labels.push(s.to_string());
        }
        lines.push(line);
    }
    if lines.is_empty() {
        return Err(data_err(
            path,
            "no data rows; expected a header row and at least one data row",
        ));
    }
    Ok(RawTable {
        features: names,
        x,
        labels,
        lines,
    })
}

/// Decides the task and class list from the training labels.
fn resolve_task(path: &Path, task: Task, labels: &[String]) -> Result<(Task, Vec<String>)> {
    // Labels that parse as finite f32 numbers; `nan`, `inf` or 1e39 count as text.
    let numeric: Option<Vec<f64>> = labels
        .iter()
        .map(|s| {
            s.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .map(|v| v as f64)
        })
        .collect();
    let classes_of = |labels: &[String]| {
        let mut c: Vec<String> = labels.to_vec();
        match &numeric {
            Some(_) => c.sort_by(|a, b| {
                let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
                num(a).total_cmp(&num(b))
            }),
            None => c.sort(),
        }
        c.dedup();
        c
    };
    match task {
        Task::Classification => {
            let c = classes_of(labels);
            if c.len() < 2 {
                return Err(data_err(
                    path,
                    format!("the label column has a single class ({}); classification needs at least 2", c[0]),
                ));
            }
            Ok((Task::Classification, c))
        }
        Task::Regression => match numeric {
            Some(_) => Ok((Task::Regression, Vec::new())),
            None => Err(data_err(
                path,
                "data.task = \"regression\" but the label column holds text; use task = \"classification\"",
            )),
        },
        Task::Auto => {
            let integral = numeric
                .as_ref()
                .is_some_and(|v| v.iter().all(|x| x.fract() == 0.0));
            let c = classes_of(labels);
            if c.len() == 1 {
                return Err(data_err(
                    path,
                    format!("the label column holds a single value ({}); there is nothing to learn: check data.label, or add rows with other labels", c[0]),
                ));
            }
            if numeric.is_none() || (integral && c.len() <= AUTO_MAX_CLASSES && c.len() >= 2) {
                resolve_task(path, Task::Classification, labels)
            } else {
                Ok((Task::Regression, Vec::new()))
            }
        }
    }
}

fn targets(path: &Path, raw: &RawTable, schema: &Schema) -> Result<Targets> {
    let labels = raw.labels.as_ref().expect("label column checked");
    match schema.task {
        Task::Classification => {
            let mut out = Vec::with_capacity(labels.len());
            for (l, line) in labels.iter().zip(&raw.lines) {
                let i = schema.classes.iter().position(|c| c == l).ok_or_else(|| {
                    data_err(
                        path,
                        format!(
                            "line {line}: label \"{l}\" was never seen in training (classes: {}); use more data or another run.seed",
                            schema.classes.join(", ")
                        ),
                    )
                })?;
                out.push(i as u32);
            }
            Ok(Targets::Classes(out))
        }
        _ => labels
            .iter()
            .zip(&raw.lines)
            .map(|(l, line)| parse_target(path, l, *line))
            .collect::<Result<Vec<f32>>>()
            .map(Targets::Values),
    }
}

/// A finite regression target, or an error naming the line.
fn parse_target(path: &Path, s: &str, line: u64) -> Result<f32> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(data_err(
            path,
            format!(
                "line {line}: the label \"{s}\" is not a finite number, which regression needs"
            ),
        )),
    }
}

/// Loads the training and evaluation splits described by `[data]`, fits the schema on the
/// training split, and standardizes both splits.
pub fn load_split(cfg: &DataConfig, seed: u64) -> Result<(Dataset, Dataset, Schema)> {
    let raw = read_csv(&cfg.path, cfg.csv_label(), None, &cfg.drop, true)?;
    let labels = raw.labels.as_ref().expect("label column checked");
    let (train_idx, test_idx): (Vec<usize>, Vec<usize>) = match &cfg.test_path {
        Some(_) => ((0..raw.lines.len()).collect(), Vec::new()),
        None => {
            let n = raw.lines.len();
            let n_test = ((n as f64) * cfg.test_fraction).round() as usize;
            if n_test == 0 || n_test == n {
                return Err(data_err(
                    &cfg.path,
                    format!(
                        "{n} rows cannot be split with data.test_fraction = {}; add rows or set data.test_path",
                        cfg.test_fraction
                    ),
                ));
            }
            let perm = Rng::keyed(seed, "split", 0).permutation(n);
            let mut test: Vec<usize> = perm[..n_test].iter().map(|&i| i as usize).collect();
            let mut train: Vec<usize> = perm[n_test..].iter().map(|&i| i as usize).collect();
            test.sort_unstable();
            train.sort_unstable();
            (train, test)
        }
    };
    let train_labels: Vec<String> = train_idx.iter().map(|&i| labels[i].clone()).collect();
    let (task, classes) = resolve_task(&cfg.path, cfg.task, &train_labels)?;
    let d = raw.features.len();
    let mut schema = Schema {
        input_shape: Vec::new(),
        features: raw.features.clone(),
        label: cfg.csv_label().to_string(),
        input_dim: d,
        modality: tabular(),
        data_hash: fingerprint(&[Some(&cfg.path), cfg.test_path.as_ref()])?,
        task,
        classes,
        mean: vec![0.0; d],
        std: vec![1.0; d],
    };
    // Every label of the file must be a class seen in the training split (or, for regression, a
    // finite number); an unseen one is reported with its line.
    let full = Dataset {
        x: raw.x.clone(),
        n: raw.lines.len(),
        d,
        y: targets(&cfg.path, &raw, &schema)?,
    };
    let mut train = full.select(&train_idx);
    let mut test = match &cfg.test_path {
        Some(p) => {
            let raw_t = read_csv(p, cfg.csv_label(), Some(&schema.features), &[], true)?;
            Dataset {
                n: raw_t.lines.len(),
                d,
                y: targets(p, &raw_t, &schema)?,
                x: raw_t.x,
            }
        }
        None => full.select(&test_idx),
    };
    if cfg.standardize {
        fit_standardization(&train, &mut schema);
    }
    train.standardize(&schema);
    test.standardize(&schema);
    Ok((train, test, schema))
}

/// xxh3 of each file's bytes (`-` for an absent one), joined with `+`.
pub fn fingerprint(paths: &[Option<&std::path::PathBuf>]) -> Result<String> {
    paths
        .iter()
        .map(|p| match p {
            Some(p) => std::fs::read(p)
                .map(|b| crate::data::shard::checksum(&b))
                .map_err(|e| Error::io(p.as_path(), e)),
            None => Ok("-".to_string()),
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| v.join("+"))
}

/// Mean and population standard deviation per feature (std of a constant column is 1).
fn fit_standardization(train: &Dataset, schema: &mut Schema) {
    let (n, d) = (train.n as f64, train.d);
    let mut mean = vec![0f64; d];
    let mut m2 = vec![0f64; d];
    for row in train.x.chunks_exact(d) {
        for (j, &v) in row.iter().enumerate() {
            mean[j] += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    for row in train.x.chunks_exact(d) {
        for (j, &v) in row.iter().enumerate() {
            let dv = v as f64 - mean[j];
            m2[j] += dv * dv;
        }
    }
    schema.mean = mean.iter().map(|&m| m as f32).collect();
    schema.std = m2
        .iter()
        .map(|&s| {
            let sd = (s / n).sqrt();
            if sd < 1e-6 {
                1.0
            } else {
                sd as f32
            }
        })
        .collect();
}

/// Reads rows to predict on: the schema's feature columns by name; with `with_labels`, the label
/// column too, if present (for scoring). Standardization is applied.
pub fn load_for_inference(
    path: &Path,
    schema: &Schema,
    with_labels: bool,
) -> Result<(Dataset, Option<Targets>)> {
    let raw = read_csv(path, &schema.label, Some(&schema.features), &[], false)?;
    let y = match raw.labels.is_some() && with_labels {
        true => Some(targets(path, &raw, schema)?),
        false => None,
    };
    let mut ds = Dataset {
        n: raw.lines.len(),
        d: schema.features.len(),
        x: raw.x,
        y: y.clone().unwrap_or(Targets::Values(Vec::new())),
    };
    ds.standardize(schema);
    Ok((ds, y))
}
