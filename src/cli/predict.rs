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
    /// CSV whose header names the model's feature columns (extra columns are ignored). For a
    /// text model: a file of texts (one per line, or JSON lines / CSV with a `text` field).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["image", "text"])]
    pub input: Option<PathBuf>,
    /// A text to classify (text models); repeatable.
    #[arg(long, value_name = "TEXT", conflicts_with_all = ["input", "image"])]
    pub text: Vec<String>,
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
    let loaded = load_run_model(&a.run_dir, a.checkpoint)?;
    if loaded.schema.modality == "text" {
        let texts = match &a.input {
            Some(f) => super::read_texts(f)?,
            None => a.text.clone(),
        };
        return classify_texts(&a, loaded, &texts);
    }
    if !a.text.is_empty() {
        anyhow::bail!(
            "{}: --text needs a text model; this run reads {} (use --input CSV or --image)",
            a.run_dir.display(),
            loaded.schema.modality
        );
    }
    let LoadedRun { schema, model, .. } = loaded;
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

/// `wick predict RUN --text …`: the label and class probabilities of each text, batched, with
/// the inference time.
fn classify_texts(a: &PredictArgs, run: LoadedRun, texts: &[String]) -> anyhow::Result<()> {
    let LoadedRun {
        schema, model, cfg, ..
    } = run;
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        anyhow::bail!(
            "text {}: the text is empty; give some words to classify",
            i + 1
        );
    }
    let tok_path = cfg.data.tokenizer.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the run config names no data.tokenizer",
            a.run_dir.display()
        )
    })?;
    let tok = crate::data::text::load_tokenizer(tok_path, cfg.data.max_len)?;
    let k = schema.outputs();
    let device = candle_core::Device::Cpu;
    let t0 = std::time::Instant::now();
    let mut probs = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, mask) = crate::data::text::encode_batch(&tok, &refs, &device)?;
        let mut ctx = crate::model::ModelCtx::eval().with_mask(Some(mask));
        let out = model.forward(&ids, &mut ctx)?;
        for row in out.to_vec2::<f32>()? {
            probs.push(softmax(&row[..k]));
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for (text, p) in texts.iter().zip(&probs) {
        let best = argmax(p);
        if a.json {
            let all: serde_json::Map<String, serde_json::Value> = schema
                .classes
                .iter()
                .zip(p)
                .map(|(c, v)| (c.clone(), serde_json::json!(v)))
                .collect();
            println!(
                "{}",
                serde_json::json!({"text": text, "label": schema.classes[best], "probability": p[best], "probabilities": all})
            );
        } else {
            let all: Vec<String> = schema
                .classes
                .iter()
                .zip(p)
                .map(|(c, v)| format!("{c} {v:.4}"))
                .collect();
            let short: String = text.chars().take(60).collect();
            println!(
                "{:<8} {:.4}  [{}]  {short:?}",
                schema.classes[best],
                p[best],
                all.join(", ")
            );
        }
    }
    eprintln!(
        "{} texts in {ms:.1} ms ({:.1} ms per text)",
        texts.len(),
        ms / texts.len().max(1) as f64
    );
    Ok(())
}
