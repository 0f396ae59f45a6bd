//! `wick predict`.

use std::path::PathBuf;

use clap::Args;

use super::{load_run_model, LoadedRun, Which};
use crate::config::Task;
use crate::data::table::load_for_inference;
use crate::train::metrics::{argmax, softmax};
use crate::train::predict;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A run directory written by `wick train`.
    pub run_dir: PathBuf,
    /// CSV whose header names the model's feature columns (extra columns are ignored).
    #[arg(long, value_name = "CSV")]
    pub input: PathBuf,
    /// Which checkpoint to use.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Print JSON lines (one object per row) instead of CSV.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    let LoadedRun { schema, model, .. } = load_run_model(&a.run_dir, a.checkpoint)?;
    let (ds, _) = load_for_inference(&a.input, &schema, false)?;
    let t0 = std::time::Instant::now();
    let out = predict(model.as_ref(), &ds)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let k = schema.outputs();
    if !a.json {
        match schema.task {
            Task::Regression => println!("row,prediction"),
            _ => println!("row,label,probability"),
        }
    }
    for (i, row) in out.chunks_exact(k).enumerate() {
        match schema.task {
            Task::Regression => {
                if a.json {
                    println!("{}", serde_json::json!({"row": i, "prediction": row[0]}));
                } else {
                    println!("{i},{}", row[0]);
                }
            }
            _ => {
                let p = softmax(row);
                let best = argmax(row);
                if a.json {
                    let probs: serde_json::Map<String, serde_json::Value> = schema
                        .classes
                        .iter()
                        .zip(&p)
                        .map(|(c, v)| (c.clone(), serde_json::json!(v)))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"row": i, "label": schema.classes[best], "probability": p[best], "probabilities": probs})
                    );
                } else {
                    println!("{i},{},{:.4}", schema.classes[best], p[best]);
                }
            }
        }
    }
    eprintln!("{} rows in {ms:.2} ms", ds.n);
    Ok(())
}
