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
    #[arg(long, value_name = "CSV", required_unless_present = "image")]
    pub input: Option<PathBuf>,
    /// Image files (JPEG/PNG) to classify, through the run's image pipeline; repeatable.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with = "input")]
    pub image: Vec<PathBuf>,
    /// With --image: how many classes to print per image.
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub top_k: usize,
    /// Which checkpoint to use.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Print JSON lines (one object per row) instead of CSV.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    if !a.image.is_empty() {
        return images(&a);
    }
    let LoadedRun { schema, model, .. } = load_run_model(&a.run_dir, a.checkpoint)?;
    let input = a.input.as_ref().expect("clap requires --input or --image");
    let (ds, _) = load_for_inference(input, &schema, false)?;
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

/// `wick predict RUN --image FILE…`: top-k classes per image, with the inference time.
fn images(a: &PredictArgs) -> anyhow::Result<()> {
    let LoadedRun {
        schema, model, cfg, ..
    } = load_run_model(&a.run_dir, a.checkpoint)?;
    if schema.task == Task::Regression {
        anyhow::bail!(
            "{}: --image needs a classifier; this run is a regression",
            a.run_dir.display()
        );
    }
    let Some([c, h, w]) = crate::model::sample_shape(&cfg.model, &schema) else {
        anyhow::bail!(
            "{}: the model was not trained on images (its input is {} features); use --input CSV",
            a.run_dir.display(),
            schema.input_dim
        );
    };
    if c * h * w != schema.input_dim {
        anyhow::bail!(
            "{}: the model's input shape [{c}, {h}, {w}] does not match its {} inputs",
            a.run_dir.display(),
            schema.input_dim
        );
    }
    // Image runs use their pipeline (resize, crop, normalize). Runs on pixel tensors get the
    // image as raw 0..255 pixels resized to the model's size, then the run's standardization.
    let pipeline = if schema.modality == "image" {
        cfg.data.image.clone()
    } else {
        crate::data::image::ImageConfig {
            resize: Some([h, w]),
            channels: c,
            mean: vec![0.0; c],
            std: vec![1.0 / 255.0; c],
            ..Default::default()
        }
    };
    let k = schema.outputs();
    let mut x = vec![0f32; c * h * w];
    for file in &a.image {
        let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let t0 = std::time::Instant::now();
        crate::data::image::transform(&bytes, &pipeline, (h, w), None, &mut x)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        if schema.modality != "image" && schema.mean.len() == x.len() {
            for ((v, m), s) in x.iter_mut().zip(&schema.mean).zip(&schema.std) {
                *v = (*v - m) / if *s > 1e-6 { *s } else { 1.0 };
            }
        }
        let xs = candle_core::Tensor::from_slice(&x, (1, x.len()), &candle_core::Device::Cpu)?;
        let out = model.forward(&xs, &mut crate::model::ModelCtx::eval())?;
        let logits: Vec<f32> = out.flatten_all()?.to_vec1()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let p = softmax(&logits[..k]);
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&i, &j| p[j].total_cmp(&p[i]).then(i.cmp(&j)));
        order.truncate(a.top_k.max(1));
        if a.json {
            let top: Vec<serde_json::Value> = order
                .iter()
                .map(|&i| serde_json::json!({"label": schema.classes[i], "probability": p[i]}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"image": file.display().to_string(), "top": top, "ms": ms})
            );
        } else {
            println!("{} ({ms:.1} ms)", file.display());
            for &i in &order {
                println!("  {:<20} {:.4}", schema.classes[i], p[i]);
            }
        }
    }
    Ok(())
}
