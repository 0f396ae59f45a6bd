//! `wick eval`.

use std::path::PathBuf;

use clap::Args;

use super::{load_run_model, LoadedRun, Which};
use crate::data::table::load_for_inference;
use crate::data::{open_sources, Source};
use crate::train::metrics;
use crate::train::predict;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory written by `wick train`.
    pub run_dir: PathBuf,
    /// Evaluate on this CSV (with the label column) instead of the run's held-out split.
    #[arg(long, value_name = "CSV")]
    pub data: Option<PathBuf>,
    /// Which checkpoint to evaluate.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let LoadedRun {
        schema,
        cfg,
        model,
        checkpoint: ckpt,
    } = load_run_model(&a.run_dir, a.checkpoint)?;
    let (ds, source): (Box<dyn Source>, String) = match &a.data {
        Some(p) => {
            let (ds, y) = load_for_inference(p, &schema, true)?;
            if y.is_none() {
                anyhow::bail!(
                    "{}: no label column `{}`; eval needs labels (use `wick predict` for unlabelled rows)",
                    p.display(),
                    schema.label
                );
            }
            (Box::new(ds), p.display().to_string())
        }
        None => {
            let (_, eval, now) = open_sources(&cfg.data, cfg.run.seed)?;
            if now != schema {
                anyhow::bail!(
                    "{}: the data changed since the run was trained; pass --data CSV to evaluate on another file",
                    cfg.data.path.display()
                );
            }
            let what = match &cfg.data.test_path {
                Some(t) => t.display().to_string(),
                None => format!("held-out split of {}", cfg.data.path.display()),
            };
            (eval, what)
        }
    };
    let out = predict(model.as_ref(), ds.as_ref())?;
    let m = metrics::evaluate(&out, schema.outputs(), &ds.targets()?);
    if a.json {
        let v = serde_json::json!({
            "run_dir": a.run_dir,
            "checkpoint": ckpt,
            "data": source,
            "samples": ds.len(),
            "metrics": m,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("checkpoint {}", ckpt.display());
        println!("data       {source} ({} rows)", ds.len());
        for (k, v) in &m {
            println!("{k:<10} {v:.6}");
        }
    }
    Ok(())
}
