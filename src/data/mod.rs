//! Datasets and batching.
//!
//! [`table`] reads CSV tables into an in-memory [`Dataset`] plus its [`Schema`] (feature
//! names, classes, standardization statistics); [`loader`] turns a dataset into seeded,
//! resumable mini-batches.

pub mod image;
pub mod loader;
pub mod pack;
pub mod shard;
pub mod shardset;
pub mod shift;
pub mod source;
pub mod synthetic;
pub mod table;
pub mod text;

pub use loader::{Batch, BatchPlan};
pub use shardset::ShardSet;
pub use source::{Augment, ShardSource, Source, Subset};
pub use table::{load_split, Dataset, Schema, Targets};

use std::sync::Arc;

use crate::config::{DataConfig, Task};
use crate::rng::Rng;
use crate::{Error, Result};

/// Training source, evaluation source and their schema.
pub type Sources = (Box<dyn Source>, Box<dyn Source>, Schema);

/// The training and evaluation sources described by `[data]`, and their schema: a CSV table
/// (read into memory) or shard directories (memory-mapped).
pub fn open_sources(cfg: &DataConfig, seed: u64) -> Result<Sources> {
    if !cfg.path.join(shard::MANIFEST).is_file() {
        let (train, eval, schema) = load_split(cfg, seed)?;
        return Ok((Box::new(train), Box::new(eval), schema));
    }
    let set = ShardSet::open(&cfg.path, cfg.verify_checksums)?;
    let m = set.manifest.clone();
    let dir = cfg.path.display();
    let label = match (&cfg.label, &m.label) {
        (Some(l), _) => l.clone(),
        (None, Some(l)) => l.clone(),
        (None, None) => {
            return Err(Error::Data(format!(
                "{dir}: the manifest names no label field; set data.label"
            )))
        }
    };
    let input = match &cfg.input {
        Some(i) => i.clone(),
        None => m
            .fields
            .iter()
            .find(|f| {
                f.name != label && (f.shape.is_some() || f.kind == "image" || f.kind == "text")
            })
            .map(|f| f.name.clone())
            .ok_or_else(|| {
                Error::Data(format!(
                    "{dir}: no input field (fixed-shape, image or text); set data.input"
                ))
            })?,
    };
    if m.field(&input)
        .is_some_and(|f| f.kind == "image" && f.shape.is_none())
    {
        return open_images(cfg, seed, set, &input, &label);
    }
    if m.field(&input).is_some_and(|f| f.kind == "text") {
        return open_text(cfg, seed, set, &input, &label);
    }
    let norm = if cfg.standardize {
        m.stats.get(&input)
    } else {
        None
    };
    if input == label {
        return Err(Error::Config(format!(
            "{dir}: data.input and the label are both `{label}`; set data.input to a feature field"
        )));
    }
    let regression = m
        .field(&label)
        .is_some_and(|f| f.dtype == shard::Dtype::F32);
    let task = match (cfg.task, regression) {
        (Task::Regression, _) | (Task::Auto, true) => Task::Regression,
        (Task::Classification, true) => {
            return Err(Error::Config(format!(
                "{dir}: data.task = \"classification\", but the label field `{label}` holds real values (packed with --regression); set data.task = \"regression\", or pack the data again without --regression"
            )))
        }
        _ => Task::Classification,
    };
    let classes = match task {
        Task::Classification => class_names(&cfg.path, &set, &label, &m.classes)?,
        _ => Vec::new(),
    };
    let n_classes = classes.len();
    let train = ShardSource::new(set, &input, &label, norm)?;
    let dim = train.dim();
    let stats = norm.cloned();
    let schema = Schema {
        input_shape: m
            .field(&input)
            .and_then(|f| f.shape.clone())
            .unwrap_or_default(),
        modality: "tabular".into(),
        data_hash: shards_fingerprint(cfg, None)?,
        features: if m.feature_names.len() == dim {
            m.feature_names.clone()
        } else {
            vec![input.clone()]
        },
        input_dim: dim,
        label: label.clone(),
        task,
        classes,
        mean: stats
            .as_ref()
            .map(|s| s.mean.iter().map(|&v| v as f32).collect())
            .unwrap_or_default(),
        std: stats
            .as_ref()
            .map(|s| s.std.iter().map(|&v| v as f32).collect())
            .unwrap_or_default(),
    };
    let eval = match &cfg.test_path {
        Some(p) => {
            let tset = open_eval_set(p, cfg, &m, &label, n_classes)?;
            // Evaluation data is normalized with the *training* statistics.
            Some(ShardSource::new(tset, &input, &label, norm)?)
        }
        None => None,
    };
    pair(train, eval, cfg, seed, schema)
}

/// `train` with `data.random_shift` applied ([`shift`]) to its samples, `shape` images
/// (`[channels, height, width]`: the data's own shape or `model.input_shape`) of `input_dim`
/// values; `train` itself when the shift is 0.
pub fn shift_training(
    train: Box<dyn Source>,
    cfg: &DataConfig,
    shape: Option<[usize; 3]>,
    input_dim: usize,
) -> Result<Box<dyn Source>> {
    let pad = cfg.random_shift;
    if pad == 0 {
        return Ok(train);
    }
    let dir = cfg.path.display();
    let Some(shape) = shape else {
        return Err(Error::Data(format!(
            "{dir}: data.random_shift = {pad} needs image-shaped samples, but each sample is a vector of {input_dim} values; use shards packed with an image shape or encoded images, set model.input_shape = [channels, height, width], or remove data.random_shift"
        )));
    };
    if shape.iter().product::<usize>() != input_dim {
        return Err(Error::Data(format!(
            "{dir}: data.random_shift = {pad}: a {shape:?} image holds {} values but a sample has {input_dim}; fix model.input_shape",
            shape.iter().product::<usize>()
        )));
    }
    if pad >= shape[1].min(shape[2]) {
        return Err(Error::Data(format!(
            "{dir}: data.random_shift = {pad} would move {}x{} images out of the frame; use a shift smaller than {}",
            shape[1],
            shape[2],
            shape[1].min(shape[2])
        )));
    }
    Ok(Box::new(shift::Shifted::new(train, shape, pad)))
}

/// The evaluation shards of `data.test_path`, which must have the training set's fields.
fn open_eval_set(
    p: &std::path::Path,
    cfg: &DataConfig,
    train: &shard::Manifest,
    label: &str,
    classes: usize,
) -> Result<ShardSet> {
    let set = ShardSet::open(p, cfg.verify_checksums)?;
    if set.manifest.fields != train.fields {
        return Err(Error::Data(format!(
            "{}: its fields differ from the training shards in {}",
            p.display(),
            cfg.path.display()
        )));
    }
    let (ours, theirs) = (&set.manifest.classes, &train.classes);
    if ours != theirs && !theirs.is_empty() {
        if let Some(c) = ours.iter().find(|c| !theirs.contains(c)) {
            return Err(Error::Data(format!(
                "{}: label \"{c}\" was never seen in training (the training shards in {} have classes: {}); remove those samples or add labelled examples of it to the training data",
                p.display(),
                cfg.path.display(),
                theirs.join(", ")
            )));
        }
        return Err(Error::Data(format!(
            "{}: its classes [{}] are numbered differently from the training shards' [{}]; pack the test data together with the training data and use data.test_fraction",
            p.display(),
            ours.join(", "),
            theirs.join(", ")
        )));
    }
    if classes > 0 {
        check_labels(p, &set, label, classes)?;
    }
    Ok(set)
}

/// `s` for a message or a table column: at most `n` characters, the last one `…` when cut.
pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// More classes than this without a class list in the manifest is a corrupt label, not a
/// classifier head to build.
const MAX_IMPLICIT_CLASSES: i64 = 1 << 20;

/// The classes of the classification label `label` of `set`: the manifest's list, or `0` to
/// the largest label when it has none. Every label must be a class index.
fn class_names(
    dir: &std::path::Path,
    set: &ShardSet,
    label: &str,
    listed: &[String],
) -> Result<Vec<String>> {
    if listed.len() == 1 {
        return Err(Error::Data(format!(
            "{}: the label `{label}` has a single class ({}); classification needs at least 2",
            dir.display(),
            listed[0]
        )));
    }
    if !listed.is_empty() {
        check_labels(dir, set, label, listed.len())?;
        return Ok(listed.to_vec());
    }
    let Some(f) = set.field_index(label) else {
        return Ok(Vec::new()); // the source names the missing field
    };
    let max = (0..set.len()).map(|i| set.label(f, i)).max().unwrap_or(-1);
    if max >= MAX_IMPLICIT_CLASSES {
        return Err(Error::Data(format!(
            "{}: a label is {max}, and the manifest lists no classes: that would be {} classes; labels are class indices from 0, so pack the data again with `wick data pack`",
            dir.display(),
            max as i128 + 1
        )));
    }
    let k = (max + 1).max(0) as usize;
    check_labels(dir, set, label, k)?;
    if k < 2 {
        return Err(Error::Data(format!(
            "{}: the label `{label}` has {k} class{}; classification needs at least 2",
            dir.display(),
            if k == 1 { " (0)" } else { "es" }
        )));
    }
    Ok((0..k).map(|i| i.to_string()).collect())
}

/// Every label of `set` is a class index below `classes`.
fn check_labels(dir: &std::path::Path, set: &ShardSet, label: &str, classes: usize) -> Result<()> {
    let Some(f) = set.field_index(label) else {
        return Ok(());
    };
    if let Some((i, y)) = (0..set.len())
        .map(|i| (i, set.label(f, i)))
        .find(|&(_, y)| y < 0 || y as u64 >= classes as u64)
    {
        return Err(Error::Data(format!(
            "{}: sample {i} has label {y}, but the classes are numbered 0 to {}; pack the data again with `wick data pack`",
            dir.display(),
            classes as i64 - 1
        )));
    }
    Ok(())
}

/// Training and evaluation sources: `eval` from `data.test_path`, or else a seeded split of
/// `train` by `data.test_fraction`.
fn pair<S: Source + 'static>(
    train: S,
    eval: Option<S>,
    cfg: &DataConfig,
    seed: u64,
    schema: Schema,
) -> Result<Sources> {
    match eval {
        Some(eval) => Ok((Box::new(train), Box::new(eval), schema)),
        None => {
            let (tr, test) = split_indices(train.len(), cfg.test_fraction, seed, &cfg.path)?;
            let inner: Arc<dyn Source> = Arc::new(train);
            Ok((
                Box::new(Subset {
                    inner: inner.clone(),
                    idx: tr,
                }),
                Box::new(Subset { inner, idx: test }),
                schema,
            ))
        }
    }
}

/// Sources over encoded images (`[data.image]` pipeline).
fn open_images(
    cfg: &DataConfig,
    seed: u64,
    set: ShardSet,
    input: &str,
    label: &str,
) -> Result<Sources> {
    let m = set.manifest.clone();
    let classes = class_names(&cfg.path, &set, label, &m.classes)?;
    let train = image::ImageSource::new(set, input, label, cfg.image.clone())?;
    let [c, h, w] = train.shape();
    let schema = Schema {
        input_shape: vec![c, h, w],
        features: vec![format!("{input}[{c}x{h}x{w}]")],
        input_dim: train.dim(),
        modality: "image".into(),
        data_hash: shards_fingerprint(cfg, None)?,
        label: label.to_string(),
        task: Task::Classification,
        classes: classes.clone(),
        mean: cfg.image.mean.clone(),
        std: cfg.image.std.clone(),
    };
    let eval = match &cfg.test_path {
        Some(p) => Some(image::ImageSource::new(
            open_eval_set(p, cfg, &m, label, classes.len())?,
            input,
            label,
            cfg.image.clone(),
        )?),
        None => None,
    };
    pair(train, eval, cfg, seed, schema)
}

/// Sources over raw text, tokenized at load time with `data.tokenizer`.
fn open_text(
    cfg: &DataConfig,
    seed: u64,
    set: ShardSet,
    input: &str,
    label: &str,
) -> Result<Sources> {
    let path = cfg.tokenizer.as_ref().ok_or_else(|| {
        Error::Config(format!(
            "{} holds text; set data.tokenizer to a tokenizer.json (e.g. checkpoints/pretrained/all-MiniLM-L6-v2/tokenizer.json)",
            cfg.path.display()
        ))
    })?;
    let tok = text::load_tokenizer(path, cfg.max_len)?;
    let m = set.manifest.clone();
    let classes = class_names(&cfg.path, &set, label, &m.classes)?;
    let train = text::TextSource::new(set, input, label, tok.clone())?;
    let schema = Schema {
        input_shape: Vec::new(),
        features: vec![input.to_string()],
        input_dim: cfg.max_len,
        modality: "text".into(),
        data_hash: shards_fingerprint(cfg, Some(path))?,
        label: label.to_string(),
        task: Task::Classification,
        classes: classes.clone(),
        mean: Vec::new(),
        std: Vec::new(),
    };
    let eval = match &cfg.test_path {
        Some(p) => Some(text::TextSource::new(
            open_eval_set(p, cfg, &m, label, classes.len())?,
            input,
            label,
            tok,
        )?),
        None => None,
    };
    pair(train, eval, cfg, seed, schema)
}

/// The fingerprint of shard datasets: their manifests (which hold every shard's checksum),
/// plus `extra` (a tokenizer file).
fn shards_fingerprint(cfg: &DataConfig, extra: Option<&std::path::PathBuf>) -> Result<String> {
    let train = cfg.path.join(shard::MANIFEST);
    let test = cfg.test_path.as_ref().map(|p| p.join(shard::MANIFEST));
    table::fingerprint(&[Some(&train), test.as_ref(), extra])
}

/// A seeded train/eval split of `n` samples (sorted index lists).
fn split_indices(
    n: usize,
    fraction: f64,
    seed: u64,
    path: &std::path::Path,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let n_test = ((n as f64) * fraction).round() as usize;
    if n_test == 0 || n_test >= n {
        return Err(Error::Data(format!(
            "{}: {n} samples cannot be split with data.test_fraction = {fraction}; set data.test_path",
            path.display()
        )));
    }
    let perm = Rng::keyed(seed, "split", 0).permutation(n);
    let mut test = perm[..n_test].to_vec();
    let mut train = perm[n_test..].to_vec();
    test.sort_unstable();
    train.sort_unstable();
    Ok((train, test))
}
