//! Range checks and path resolution, run after parsing. Each failure is one line naming the
//! file, the key, the value, what is expected and the fix.

use std::path::{Path, PathBuf};

use super::{Config, OptimKind, ScheduleKind, Task};
use crate::{Error, Result};

/// The longest `dist.timeout_s` accepted: 30 days.
const MAX_TIMEOUT_S: f64 = 2_592_000.0;

/// A BERT's pretrained directory (relative paths resolved like data paths), its tokenizer as
/// the data's default, and `model.max_len` as the data's truncation length.
fn resolve_bert(cfg: &mut Config, origin: &str, base: &Path) -> Result<()> {
    let Some(spec) = cfg.model.pretrained.clone() else {
        return Err(Error::Config(format!(
            "{origin}: model.kind = \"bert\" needs `model.pretrained` = a Hugging Face model directory or hf:OWNER/NAME, e.g. \"checkpoints/pretrained/all-MiniLM-L6-v2\" (fetched by scripts/fetch-minilm.sh)"
        )));
    };
    if !spec.starts_with("hf:") {
        let p = resolve(origin, "model.pretrained", Path::new(&spec), base)?;
        cfg.model.pretrained = Some(p.display().to_string());
    }
    if cfg.data.tokenizer.is_none() {
        let files = crate::model::bert::ModelFiles::locate(
            cfg.model.pretrained.as_deref().unwrap_or_default(),
        )
        .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        cfg.data.tokenizer = Some(files.tokenizer);
    }
    if let Some(n) = cfg.model.max_len {
        cfg.data.max_len = n;
    }
    Ok(())
}

/// Resolves relative data paths (working directory first, then the config's directory) to
/// absolute ones and checks every value's range.
pub(crate) fn resolve_and_validate(cfg: &mut Config, origin: &str, base: &Path) -> Result<()> {
    let bad = |key: &str, value: String, expected: &str| {
        Err(Error::Config(format!(
            "{origin}: `{key}` = {value}: expected {expected}"
        )))
    };
    if cfg.data.path.as_os_str().is_empty() {
        return Err(Error::Config(format!(
            "{origin}: [data] is missing the required key `path`; add e.g. path = \"data/sklearn/iris.csv\""
        )));
    }
    cfg.data.path = resolve(origin, "data.path", &cfg.data.path, base)?;
    if let Some(p) = &cfg.data.test_path {
        cfg.data.test_path = Some(resolve(origin, "data.test_path", p, base)?);
    }
    if cfg.data.label.as_deref() == Some("") {
        return bad("data.label", "\"\"".into(), "the name of the label column");
    }
    cfg.data.image.validate(origin)?;
    if let Some(p) = &cfg.data.tokenizer {
        cfg.data.tokenizer = Some(resolve(origin, "data.tokenizer", p, base)?);
    }
    if cfg.model.kind == super::ModelKind::Bert {
        resolve_bert(cfg, origin, base)?;
    }
    if cfg.data.max_len < 2 || cfg.data.max_len > 1 << 16 {
        return bad(
            "data.max_len",
            cfg.data.max_len.to_string(),
            "a token count from 2 to 65536, e.g. 128",
        );
    }
    if cfg.data.shuffle_window == 0 {
        return bad(
            "data.shuffle_window",
            "0".into(),
            "1 or more shards per window",
        );
    }
    let tf = cfg.data.test_fraction;
    if cfg.data.test_path.is_none() && !(tf > 0.0 && tf < 1.0) {
        return bad(
            "data.test_fraction",
            tf.to_string(),
            "a fraction strictly between 0 and 1, e.g. 0.2 (or set data.test_path)",
        );
    }
    match crate::config::parse_device(&cfg.run.device) {
        Some(crate::config::DeviceSpec::Cpu) => {}
        Some(crate::config::DeviceSpec::Cuda(_)) if cfg!(feature = "cuda") => {}
        Some(crate::config::DeviceSpec::Cuda(_)) => {
            return bad(
                "run.device",
                format!("\"{}\"", cfg.run.device),
                "\"cpu\": this wick was built without CUDA (rebuild with `--features cuda` on a machine with the CUDA toolkit)",
            )
        }
        None => {
            return bad(
                "run.device",
                format!("\"{}\"", cfg.run.device),
                "\"cpu\", \"cuda\" or \"cuda:N\"",
            )
        }
    }
    let d = &cfg.dist;
    if !(d.timeout_s.is_finite() && d.timeout_s > 0.0 && d.timeout_s <= MAX_TIMEOUT_S) {
        return bad(
            "dist.timeout_s",
            d.timeout_s.to_string(),
            "a positive number of seconds up to 2592000 (30 days), e.g. 300",
        );
    }
    if !(d.bucket_mb.is_finite() && d.bucket_mb > 0.0) {
        return bad(
            "dist.bucket_mb",
            d.bucket_mb.to_string(),
            "a positive size in megabytes, e.g. 25",
        );
    }
    if cfg.run.name.is_empty()
        || !cfg
            .run
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return bad(
            "run.name",
            format!("{:?}", cfg.run.name),
            "a non-empty name of letters, digits, '.', '_' and '-'",
        );
    }
    if cfg
        .run
        .output_dir
        .to_str()
        .is_none_or(|s| s.trim().is_empty() || s.chars().any(char::is_control))
    {
        return bad(
            "run.output_dir",
            format!("{:?}", cfg.run.output_dir),
            "a non-empty UTF-8 path without control characters, e.g. \"checkpoints/runs\"",
        );
    }
    let m = &cfg.model;
    if m.hidden.iter().any(|&h| h > 1 << 20) {
        return bad(
            "model.hidden",
            format!("{:?}", m.hidden),
            "layer widths of at most 1048576",
        );
    }
    if m.hidden.contains(&0) {
        return bad(
            "model.hidden",
            format!("{:?}", m.hidden),
            "positive layer widths, e.g. [128, 64]",
        );
    }
    if m.width == 0 || m.width > 4096 {
        return bad(
            "model.width",
            m.width.to_string(),
            "a channel count from 1 to 4096, e.g. 64",
        );
    }
    if !(1..=4).contains(&m.stages) {
        return bad(
            "model.stages",
            m.stages.to_string(),
            "1 to 4 (ResNet stages to keep)",
        );
    }
    if m.num_classes == Some(0) {
        return bad("model.num_classes", "0".into(), "at least 1 output");
    }
    if m.head_hidden == Some(0) {
        return bad(
            "model.head_hidden",
            "0".into(),
            "a positive width, e.g. 256",
        );
    }
    if !matches!(m.in_channels, None | Some(1) | Some(3)) {
        return bad(
            "model.in_channels",
            format!("{:?}", m.in_channels.unwrap_or(0)),
            "1 (grayscale) or 3 (RGB)",
        );
    }
    if let Some(s) = &m.input_shape {
        if s.len() != 3 || s.contains(&0) {
            return bad(
                "model.input_shape",
                format!("{s:?}"),
                "[channels, height, width], e.g. [1, 28, 28]",
            );
        }
    }
    if m.kind == super::ModelKind::Bert {
        if crate::model::BertFreeze::parse(&m.freeze).is_none() {
            return bad(
                "model.freeze",
                format!("{:?}", m.freeze),
                "\"none\", \"encoder\", \"embeddings\" or \"layers:N\" for a BERT",
            );
        }
        if crate::model::Pooling::parse(&m.pooling).is_none() {
            return bad(
                "model.pooling",
                format!("{:?}", m.pooling),
                "\"cls\" (the pooler, as BertForSequenceClassification) or \"mean\" (as sentence-transformers)",
            );
        }
        if !(0.0..1.0).contains(&m.classifier_dropout) {
            return bad(
                "model.classifier_dropout",
                m.classifier_dropout.to_string(),
                "a probability in [0, 1), e.g. 0.1",
            );
        }
        if m.max_len.is_some_and(|n| !(2..=1 << 16).contains(&n)) {
            return bad(
                "model.max_len",
                format!("{}", m.max_len.unwrap_or(0)),
                "a token count from 2 to 65536, e.g. 128",
            );
        }
    } else if crate::model::resnet::Freeze::parse(&m.freeze).is_none() {
        return bad(
            "model.freeze",
            format!("{:?}", m.freeze),
            "\"none\", \"backbone\" or \"until:layer1\" .. \"until:layer4\"",
        );
    }
    if let Some(p) = m.pretrained.clone() {
        if p.is_empty() {
            return bad(
                "model.pretrained",
                "\"\"".into(),
                "a weights file, a run directory or hf:REPO",
            );
        }
        if !p.starts_with("hf:") {
            let r = resolve(origin, "model.pretrained", Path::new(&p), base)?;
            cfg.model.pretrained = Some(r.display().to_string());
        }
    }
    let m = &cfg.model;
    if !(0.0..1.0).contains(&m.dropout) {
        return bad(
            "model.dropout",
            m.dropout.to_string(),
            "a probability in [0, 1), e.g. 0.1",
        );
    }
    let o = &cfg.optim;
    if !(o.lr.is_finite() && o.lr > 0.0) {
        return bad("optim.lr", o.lr.to_string(), "a positive number, e.g. 1e-3");
    }
    let wd = o.weight_decay();
    if !(wd.is_finite() && wd >= 0.0) {
        return bad(
            "optim.weight_decay",
            wd.to_string(),
            "a number >= 0, e.g. 0.01",
        );
    }
    if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        return bad(
            "optim.betas",
            format!("{:?}", o.betas),
            "two numbers in [0, 1), e.g. [0.9, 0.999]",
        );
    }
    if !o.eps.is_finite() || o.eps <= 0.0 {
        return bad(
            "optim.eps",
            o.eps.to_string(),
            "a small positive number, e.g. 1e-8",
        );
    }
    if !(0.0..1.0).contains(&o.momentum) && o.momentum != 0.0 {
        return bad(
            "optim.momentum",
            o.momentum.to_string(),
            "a number in [0, 1), e.g. 0.9",
        );
    }
    if !(0.0..1.0).contains(&o.dampening) {
        return bad(
            "optim.dampening",
            o.dampening.to_string(),
            "a number in [0, 1)",
        );
    }
    if o.nesterov && (o.kind != OptimKind::Sgd || o.momentum <= 0.0 || o.dampening != 0.0) {
        return bad(
            "optim.nesterov",
            "true".into(),
            "nesterov only with kind = \"sgd\", momentum > 0 and dampening = 0",
        );
    }
    let s = &cfg.schedule;
    if !(0.0..1.0).contains(&s.warmup_ratio) {
        return bad(
            "schedule.warmup_ratio",
            s.warmup_ratio.to_string(),
            "a fraction in [0, 1)",
        );
    }
    if s.kind == ScheduleKind::Step && s.step_size == 0 {
        return bad(
            "schedule.step_size",
            "0".into(),
            "a positive number of epochs",
        );
    }
    if !(s.gamma > 0.0 && s.gamma <= 1.0) {
        return bad(
            "schedule.gamma",
            s.gamma.to_string(),
            "a factor in (0, 1], e.g. 0.1",
        );
    }
    if !(s.min_lr >= 0.0 && s.min_lr <= o.lr) {
        return bad(
            "schedule.min_lr",
            s.min_lr.to_string(),
            "a number in [0, optim.lr]",
        );
    }
    let t = &cfg.train;
    if t.epochs == 0 || t.epochs > 1_000_000 {
        return bad(
            "train.epochs",
            t.epochs.to_string(),
            "a number of epochs from 1 to 1000000, e.g. 10",
        );
    }
    if t.batch_size == 0 || t.batch_size > 1 << 24 {
        return bad(
            "train.batch_size",
            t.batch_size.to_string(),
            "a positive batch size, e.g. 32",
        );
    }
    if t.accumulate == 0 || t.accumulate > 1 << 20 {
        return bad(
            "train.accumulate",
            t.accumulate.to_string(),
            "1 or more micro-batches per optimizer step",
        );
    }
    if let Some(es) = &t.early_stopping {
        if es.patience == 0 {
            return bad(
                "train.early_stopping.patience",
                "0".into(),
                "1 or more evaluations",
            );
        }
        if !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
            return bad(
                "train.early_stopping.min_delta",
                es.min_delta.to_string(),
                "a number >= 0",
            );
        }
    }
    if !(t.clip_norm >= 0.0 && t.clip_norm.is_finite()) {
        return bad(
            "train.clip_norm",
            t.clip_norm.to_string(),
            "a number >= 0 (0 turns clipping off)",
        );
    }
    if t.eval_every == 0 {
        return bad(
            "train.eval_every",
            "0".into(),
            "a positive number of epochs, e.g. 1",
        );
    }
    if t.save_every == 0 {
        return bad(
            "train.save_every",
            "0".into(),
            "a positive number of epochs, e.g. 1",
        );
    }
    if t.log_every == 0 {
        return bad(
            "train.log_every",
            "0".into(),
            "a positive number of steps, e.g. 50 (--quiet turns the progress lines off)",
        );
    }
    if let Some(mon) = &t.monitor {
        let valid = monitor_names(cfg.data.task);
        if !valid.contains(&mon.as_str()) {
            let names: Vec<String> = valid.iter().map(|s| s.to_string()).collect();
            let hint = super::load::closest(mon, &names)
                .map(|s| format!("; did you mean \"{s}\"?"))
                .unwrap_or_default();
            return bad(
                "train.monitor",
                format!("\"{mon}\""),
                &format!("one of {}{hint}", valid.join(", ")),
            );
        }
    }
    Ok(())
}

/// Metric names the trainer reports and that `train.monitor` may name.
pub fn monitor_names(task: Task) -> &'static [&'static str] {
    match task {
        Task::Classification => &["eval_loss", "eval_accuracy", "eval_f1", "train_loss"],
        Task::Regression => &["eval_loss", "eval_mse", "eval_mae", "train_loss"],
        Task::Auto => &[
            "eval_loss",
            "eval_accuracy",
            "eval_f1",
            "eval_mse",
            "eval_mae",
            "train_loss",
        ],
    }
}

fn resolve(origin: &str, key: &str, p: &Path, base: &Path) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        vec![cwd.join(p), base.join(p)]
    };
    for c in &candidates {
        // model.pretrained may also name a run directory or a model directory.
        let run_dir = key == "model.pretrained" && c.is_dir();
        if c.is_file() || c.join(crate::data::shard::MANIFEST).is_file() || run_dir {
            let abs = c.canonicalize().unwrap_or_else(|_| c.clone());
            if abs.to_str().is_none() {
                return Err(Error::Config(format!(
                    "{origin}: `{key}` = {p:?}: the path is not valid UTF-8; rename it"
                )));
            }
            return Ok(abs);
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(Error::Config(format!(
        "{origin}: `{key}` = \"{}\": no such file or shard directory (looked at {}); fix the path, or run from the directory it is relative to",
        p.display(),
        looked.join(" and ")
    )))
}
