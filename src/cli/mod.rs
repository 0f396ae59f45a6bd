//! The `wick` command line. Each subcommand lives in its own file and only parses arguments,
//! calls the library and prints.

mod data;
mod embed;
mod eval;
mod launch;
mod predict;
mod quantize;
mod runs;
mod train;
mod tune;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  wick train configs/digits_mlp.toml
  wick train configs/digits_mlp.toml --set optim.lr=3e-3 --set model.hidden=[128,64]
  wick train --resume checkpoints/runs/digits_mlp-20261125-101500
  wick eval checkpoints/runs/digits_mlp-20261125-101500 --json
  wick predict checkpoints/runs/iris_mlp-20261125-101500 --input data/sklearn/iris.csv
  wick runs
  wick train configs/spam_bert.toml
  wick predict checkpoints/runs/spam_bert --text \"WIN a FREE cruise, click now\"
  wick quantize checkpoints/runs/spam_bert --calib 8
  wick eval checkpoints/runs/spam_bert/int8
  wick embed checkpoints/pretrained/all-MiniLM-L6-v2 --text \"The cat sits outside\"
  wick tune configs/tune_digits.toml
  wick launch --nproc 2 -- train configs/digits_mlp.toml
  wick tune --status checkpoints/tune/digits_tune
  wick data pack idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz --out data/fashion/train
  wick data inspect data/fashion/train
  wick data verify data/fashion/train";

/// wick: train, evaluate and serve models from a TOML file, reproducibly.
#[derive(Debug, Parser)]
#[command(name = "wick", version, about, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a TOML run config; prints the run directory as the last line.
    Train(train::TrainArgs),
    /// Evaluate a run's checkpoint on its held-out split or on another CSV.
    Eval(eval::EvalArgs),
    /// Predict labels for the rows of a CSV with a trained run.
    Predict(predict::PredictArgs),
    /// List runs as a table.
    Runs(runs::RunsArgs),
    /// Pack, inspect and verify shard datasets.
    Data(data::DataArgs),
    /// Tune hyper-parameters: a study of training runs (TPE, random or grid; pruning).
    Tune(tune::TuneArgs),
    /// Sentence embeddings from a BERT-family model (mean pooling, L2-normalised).
    Embed(embed::EmbedArgs),
    /// Quantize a trained run to int8 and compare it with f32 (size, accuracy, speed).
    Quantize(quantize::QuantizeArgs),
    /// Train on several processes or machines: runs `mpirun -np N wick …` (needs the `mpi`
    /// feature and OpenMPI).
    Launch(launch::LaunchArgs),
}

/// An error and its causes on one line, as anyhow's `{:#}` writes it, but without a cause
/// the message before it already spells out (wick's I/O errors name the path and the OS
/// error, which is also their source).
pub fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Parses `std::env::args` and runs the command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Runs(a) => runs::run(a),
        Command::Data(a) => data::run(a),
        Command::Tune(a) => tune::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Launch(a) => launch::run(a),
    }
}

/// Which checkpoint of a run to use.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Best,
    Last,
}

/// A trained run, loaded for inference.
pub(crate) struct LoadedRun {
    pub schema: crate::data::Schema,
    pub cfg: crate::config::Config,
    pub model: Box<dyn crate::model::Model>,
    /// The checkpoint directory the weights came from.
    pub checkpoint: PathBuf,
}

/// Loads a run's model with the weights of checkpoint `which` (`best` falls back to `last`).
pub(crate) fn load_run_model(run_dir: &std::path::Path, which: Which) -> anyhow::Result<LoadedRun> {
    let run = crate::train::RunDir::open(run_dir)?;
    let cfg = run.config()?;
    let schema = run.schema()?;
    let qfile = run_dir.join(crate::quant::MODEL_FILE);
    if qfile.is_file() {
        // A directory written by `wick quantize`: build the model, then install the int8
        // checkpoint (one file; `--checkpoint` does not apply).
        let mut model_cfg = cfg.model.clone();
        if model_cfg.kind == crate::config::ModelKind::Resnet {
            let shapes = crate::quant::file_shapes(&qfile)?;
            model_cfg.pretrained = None;
            if let Some(s) = shapes.get("conv1.weight") {
                model_cfg.width = s[0];
                model_cfg.in_channels = Some(s[1]);
            }
        }
        let model =
            crate::model::build(&model_cfg, &schema, cfg.run.seed, &candle_core::Device::Cpu)?;
        crate::quant::load(model.as_ref(), &qfile)?;
        return Ok(LoadedRun {
            schema,
            cfg,
            model,
            checkpoint: qfile,
        });
    }
    let which = match which {
        Which::Best => "best",
        Which::Last => "last",
    };
    let checkpoint = crate::train::checkpoint::locate_in_run(&run.path, which)?;
    let weights = checkpoint.join(crate::train::checkpoint::MODEL_FILE);
    let mut model_cfg = cfg.model.clone();
    if model_cfg.kind == crate::config::ModelKind::Resnet {
        // The checkpoint holds every weight: no pretrained file is needed, and the stem's
        // width and channels are read from it.
        let w = crate::model::pretrained::read_weights(&weights, &candle_core::Device::Cpu)?;
        model_cfg.pretrained = None;
        if let Some(width) = crate::model::resnet::stem_width(&w) {
            model_cfg.width = width;
        }
        model_cfg.in_channels = crate::model::resnet::stem_channels(&w).or(model_cfg.in_channels);
    }
    let model = crate::model::build(&model_cfg, &schema, cfg.run.seed, &candle_core::Device::Cpu)?;
    model.store().load_safetensors(&weights)?;
    Ok(LoadedRun {
        schema,
        cfg,
        model,
        checkpoint,
    })
}

/// Texts from a file: JSON lines with a `text` key (`.jsonl`), a CSV with a `text` column
/// (`.csv`), else one text per line. Errors name the line.
pub(crate) fn read_texts(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let raw = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut out = Vec::new();
    if ext == "csv" {
        let mut rdr = csv::ReaderBuilder::new().from_reader(&raw[..]);
        let header = rdr.byte_headers()?.clone();
        let col = header.iter().position(|h| h == b"text").ok_or_else(|| {
            anyhow::anyhow!("{}: line 1: no `text` column in the header", path.display())
        })?;
        for rec in rdr.byte_records() {
            let rec = rec.map_err(|e| anyhow::anyhow!("{}: malformed CSV: {e}", path.display()))?;
            let line = rec.position().map(|p| p.line()).unwrap_or(0);
            let t = std::str::from_utf8(&rec[col]).map_err(|e| {
                anyhow::anyhow!(
                    "{}: line {line}: invalid UTF-8 at byte {}; re-encode the file as UTF-8",
                    path.display(),
                    e.valid_up_to()
                )
            })?;
            out.push(t.to_string());
        }
        return Ok(out);
    }
    for (i, line) in raw.split(|&b| b == b'\n').enumerate() {
        let text = std::str::from_utf8(line).map_err(|e| {
            anyhow::anyhow!(
                "{}: line {}: invalid UTF-8 at byte {}; re-encode the file as UTF-8",
                path.display(),
                i + 1,
                e.valid_up_to()
            )
        })?;
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            continue;
        }
        if ext == "jsonl" || ext == "json" {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                anyhow::anyhow!("{}: line {}: invalid JSON: {e}", path.display(), i + 1)
            })?;
            let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                anyhow::anyhow!("{}: line {}: no string `text`", path.display(), i + 1)
            })?;
            out.push(t.to_string());
        } else {
            out.push(text.to_string());
        }
    }
    if out.is_empty() {
        anyhow::bail!("{}: no texts in the file", path.display());
    }
    Ok(out)
}
