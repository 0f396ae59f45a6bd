//! Train your own candle model with wick's trainer, checkpoints and metrics.
//!
//! `cargo run --release --example custom_model` trains a small residual network, written with
//! plain candle-nn layers, on the iris table and prints where the run went.
//!
//! A model only has to (1) build its layers through a [`ParamStore`]'s `VarBuilder`, so that
//! initial weights come from the run seed, and (2) implement [`Model::forward`], using
//! [`ModelCtx::dropout`] for dropout. Everything else — shuffling, AdamW, schedules, clipping,
//! accumulation, evaluation, early stopping, atomic checkpoints, exact resume — is wick's.
//!
//! To be quantizable (`wick::quant::quantize`), it also lists its linear layers
//! ([`Model::quant_layers`]) and runs each through [`wick::quant::linear_or`], which takes the
//! int8 path once the layer's weights are int8.

use std::path::Path;

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module};
use wick::model::{Model, ModelCtx, ParamStore};
use wick::quant::QuantLayer;
use wick::train::{RunDir, Summary, Trainer};

/// `x → linear → relu → (+ residual block) → dropout → linear`.
pub struct ResidualNet {
    store: ParamStore,
    input: Linear,
    block: Linear,
    head: Linear,
}

impl ResidualNet {
    pub fn new(seed: u64, inputs: usize, hidden: usize, classes: usize) -> Result<Self> {
        let store = ParamStore::new(seed);
        let vb = store.var_builder();
        Ok(Self {
            input: candle_nn::linear(inputs, hidden, vb.pp("input"))?,
            block: candle_nn::linear(hidden, hidden, vb.pp("block"))?,
            head: candle_nn::linear(hidden, classes, vb.pp("head"))?,
            store,
        })
    }
}

impl Model for ResidualNet {
    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn kind(&self) -> &str {
        "residual-net"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut ModelCtx) -> Result<Tensor> {
        let h = self.dense("input", &self.input, xs)?.relu()?;
        let h = (&h + self.dense("block", &self.block, &h)?.relu()?)?;
        let h = ctx.dropout(&h, 0.1)?;
        self.dense("head", &self.head, &h)
    }

    fn quant_layers(&self) -> Vec<QuantLayer> {
        ["input", "block", "head"]
            .map(|l| QuantLayer::linear(format!("{l}.weight")))
            .to_vec()
    }
}

impl ResidualNet {
    /// Linear layer `name`: int8 once quantized, else candle-nn's.
    fn dense(&self, name: &str, layer: &Linear, x: &Tensor) -> Result<Tensor> {
        wick::quant::linear_or(
            &self.store,
            &format!("{name}.weight"),
            x,
            layer.bias(),
            || layer.forward(x),
        )
    }
}

/// Trains the network on iris into `run_dir` and returns the run's summary.
pub fn run(run_dir: &Path) -> anyhow::Result<Summary> {
    let cfg = wick::config::load(
        Path::new("configs/iris_mlp.toml"),
        &["train.epochs=40".into(), "run.name=residual".into()],
    )?;
    let (train, eval, schema) = wick::data::load_split(&cfg.data, cfg.run.seed)?;
    let model = ResidualNet::new(cfg.run.seed, schema.input_dim, 32, schema.outputs())?;
    let run = RunDir::create(&cfg, &schema, Some(run_dir))?;
    let mut trainer = Trainer::new(
        cfg,
        Box::new(model),
        Box::new(train),
        Box::new(eval),
        schema,
    );
    Ok(trainer.fit(&run, false)?)
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("wick-custom-{}", std::process::id()));
    let summary = run(&dir)?;
    println!(
        "{} parameters, eval accuracy {:.3}, run in {}",
        summary.num_params,
        summary.final_metrics["eval_accuracy"],
        dir.display()
    );
    Ok(())
}
