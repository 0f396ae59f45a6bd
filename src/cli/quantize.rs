//! `wick quantize`: post-training int8 quantization of a run, with an f32 against int8 table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::{load_run_model, LoadedRun, Which};
use crate::data::{open_sources, BatchPlan, Source};
use crate::model::{Model, ModelCtx};
use crate::quant::{self, QuantConfig, QuantMode};
use crate::train::{metrics, predict, run_dir};

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A run directory written by `wick train`.
    pub run_dir: PathBuf,
    /// Where to write the quantized run (default: RUN_DIR/int8). `wick eval` and
    /// `wick predict` take it like a run directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Activations quantized per row at run time (dynamic) or with ranges calibrated on
    /// training batches (static).
    #[arg(long, value_enum, default_value = "dynamic")]
    pub mode: QuantMode,
    /// Calibration batches of training data (static ranges and the sensitivity check).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub calib: usize,
    /// Keep matching layers in f32 (a weight name, a prefix, or a pattern with `*`);
    /// repeatable.
    #[arg(long, value_name = "PATTERN")]
    pub skip: Vec<String>,
    /// Layers whose int8 output differs from f32 by more than this relative error on
    /// calibration data stay in f32.
    #[arg(long, default_value_t = 0.05, value_name = "E")]
    pub max_error: f32,
    /// Which checkpoint of the run to quantize.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Timed repetitions for the latency and throughput columns.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub iters: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    if a.run_dir.join(quant::MODEL_FILE).is_file() {
        anyhow::bail!(
            "{}: already quantized; pass the original run directory",
            a.run_dir.display()
        );
    }
    if !(a.max_error.is_finite() && a.max_error >= 0.0) {
        anyhow::bail!(
            "--max-error {}: expected a relative error of 0 or more (0.05 keeps layers that err by more than 5% in f32)",
            a.max_error
        );
    }
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("int8"));
    check_out(&a.run_dir, &out)?;
    let f32_run = load_run_model(&a.run_dir, a.checkpoint)?;
    let LoadedRun {
        cfg, model: qmodel, ..
    } = load_run_model(&a.run_dir, a.checkpoint)?;
    let (train, eval, schema) = open_sources(&cfg.data, cfg.run.seed)?;
    if schema != f32_run.schema {
        anyhow::bail!(
            "{}: the data changed since the run was trained; quantize needs the run's own data for calibration and the report",
            cfg.data.path.display()
        );
    }
    let qcfg = QuantConfig {
        mode: a.mode,
        calib_batches: a.calib,
        skip: a.skip.clone(),
        max_error: a.max_error,
        ..QuantConfig::default()
    };
    let report = quant::quantize(qmodel.as_ref(), &qcfg, Some(train.as_ref()))?;
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    for f in [run_dir::CONFIG_FILE, run_dir::SCHEMA_FILE] {
        std::fs::copy(a.run_dir.join(f), out.join(f))
            .with_context(|| format!("{}: cannot copy {f}", a.run_dir.display()))?;
    }
    let qfile = out.join(quant::MODEL_FILE);
    quant::save(qmodel.as_ref(), a.mode, &qfile)?;

    let ffile = f32_run
        .checkpoint
        .join(crate::train::checkpoint::MODEL_FILE);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let f32_side = measure(f32_run.model.as_ref(), eval.as_ref(), &schema, a.iters)?;
    let int8_side = measure(qmodel.as_ref(), eval.as_ref(), &schema, a.iters)?;
    let f32_params = 4 * f32_run.model.store().num_params();
    let int8_params = param_bytes(qmodel.as_ref());
    let v = json!({
        "run_dir": a.run_dir,
        "out": out,
        "mode": a.mode,
        "layers_int8": report.quantized(),
        "layers": report.layers,
        "f32": {"file_bytes": size(&ffile), "param_bytes": f32_params, "metrics": f32_side.0,
                "batch1_ms": f32_side.1, "batch32_per_s": f32_side.2},
        "int8": {"file_bytes": size(&qfile), "param_bytes": int8_params, "metrics": int8_side.0,
                 "batch1_ms": int8_side.1, "batch32_per_s": int8_side.2},
        "eval_samples": eval.len(),
    });
    crate::io::write_atomic(
        &out.join(quant::REPORT_FILE),
        serde_json::to_string_pretty(&v)?.as_bytes(),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let skipped: Vec<String> = report
        .layers
        .iter()
        .filter(|l| l.status != "int8")
        .map(|l| format!("{} {}", l.name, l.status))
        .collect();
    println!(
        "{} of {} layers int8 ({} mode){}",
        report.quantized(),
        report.layers.len(),
        a.mode.as_str(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; kept in f32: {}", skipped.join(", "))
        }
    );
    println!("{:<22} {:>14} {:>14} {:>8}", "", "f32", "int8", "ratio");
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    let row = |name: &str, f: String, q: String, r: f64| {
        println!("{name:<22} {f:>14} {q:>14} {r:>7.2}x");
    };
    let (fs, qs) = (size(&ffile), size(&qfile));
    row("file size", mb(fs), mb(qs), qs as f64 / fs.max(1) as f64);
    row(
        "parameter bytes",
        mb(f32_params as u64),
        mb(int8_params as u64),
        int8_params as f64 / f32_params.max(1) as f64,
    );
    for (k, fv) in &f32_side.0 {
        let qv = int8_side.0.get(k).copied().unwrap_or(f64::NAN);
        row(k, format!("{fv:.4}"), format!("{qv:.4}"), qv / fv);
    }
    row(
        "latency, batch 1",
        format!("{:.2} ms", f32_side.1),
        format!("{:.2} ms", int8_side.1),
        f32_side.1 / int8_side.1,
    );
    row(
        "throughput, batch 32",
        format!("{:.1}/s", f32_side.2),
        format!("{:.1}/s", int8_side.2),
        int8_side.2 / f32_side.2,
    );
    println!(
        "metrics on {} held-out samples; speed ratios are f32 time / int8 time",
        eval.len()
    );
    println!("{}", out.display());
    Ok(())
}

/// Bytes of the parameters as stored: int8 values and scales where quantized, f32 elsewhere.
fn param_bytes(model: &dyn Model) -> usize {
    let store = model.store();
    let q = store.quantized_all();
    store
        .params()
        .iter()
        .map(|p| match q.get(&p.name) {
            Some(t) => t.bytes(),
            None => 4 * p.var.elem_count(),
        })
        .sum()
}

/// Refuses an `--out` that would overwrite a run: the run itself (copying its `config.toml`
/// onto itself empties it) or another run's directory. A previous quantized output may be
/// replaced.
fn check_out(run_dir: &Path, out: &Path) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let same = match (run_dir.canonicalize(), out.canonicalize()) {
        (Ok(r), Ok(o)) => r == o,
        _ => false,
    };
    if same {
        anyhow::bail!(
            "--out {}: that is the run being quantized; leave --out out (it writes {}) or name a new directory",
            out.display(),
            run_dir.join("int8").display()
        );
    }
    if !out.is_dir() {
        anyhow::bail!(
            "--out {}: exists and is not a directory; name a new directory",
            out.display()
        );
    }
    if out.join(run_dir::CONFIG_FILE).is_file() && !out.join(quant::MODEL_FILE).is_file() {
        anyhow::bail!(
            "--out {}: holds another run ({} is there), which quantize would overwrite; name a new directory",
            out.display(),
            run_dir::CONFIG_FILE
        );
    }
    Ok(())
}

/// Metrics on `eval`, median latency at batch 1 (ms) and throughput at batch 32 (samples/s).
fn measure(
    model: &dyn Model,
    eval: &dyn Source,
    schema: &crate::data::Schema,
    iters: usize,
) -> anyhow::Result<(metrics::Metrics, f64, f64)> {
    let out = predict(model, eval)?;
    let m = metrics::evaluate(&out, schema.outputs(), &eval.targets()?);
    let device = model.store().device().clone();
    let time = |rows: usize| -> anyhow::Result<f64> {
        let rows = rows.min(eval.len()).max(1);
        let b = BatchPlan::sequential(eval.len(), rows).batch(eval, 0, &device)?;
        let run = || -> anyhow::Result<()> {
            let mut ctx = ModelCtx::eval().with_mask(b.mask.clone());
            model.forward(&b.x, &mut ctx)?;
            Ok(())
        };
        run()?;
        let mut t = Vec::new();
        for _ in 0..iters.max(1) {
            let s = Instant::now();
            run()?;
            t.push(s.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let b1 = time(1)? * 1e3;
    let rows = 32.min(eval.len()).max(1);
    let b32 = rows as f64 / time(32)?;
    Ok((m, b1, b32))
}
