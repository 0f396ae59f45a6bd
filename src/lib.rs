//! # wick
//!
//! A pure-Rust machine-learning training framework built on [candle](https://github.com/huggingface/candle).
//! Runs are described by a TOML file, are reproducible bit for bit from one seed, and write
//! crash-safe checkpoints that resume exactly.
//!
//! The crate is laid out by pipeline stage:
//!
//! - [`config`]: the TOML run configuration, its defaults, overrides and validation;
//! - [`data`]: datasets and the seeded batch loader;
//! - [`model`]: the [`model::Model`] trait, seeded parameter initialisation and built-in models;
//! - [`train`]: the trainer, optimizers, LR schedules, metrics, hooks and checkpoints;
//! - [`dist`]: data-parallel training over MPI (CPU ranks) or NCCL (GPUs);
//! - [`cli`]: the `wick` command line, a thin layer over the above.
//!
//! Train a custom candle model with the same trainer by implementing [`model::Model`]:
//!
//! ```
//! use candle_core::{Result, Tensor};
//! use wick::model::{Model, ModelCtx, ParamStore};
//!
//! /// Logistic regression: one linear layer.
//! struct LogReg { store: ParamStore, lin: candle_nn::Linear }
//!
//! impl LogReg {
//!     fn new(seed: u64, inputs: usize, classes: usize) -> Result<Self> {
//!         let store = ParamStore::new(seed);
//!         let lin = candle_nn::linear(inputs, classes, store.var_builder().pp("fc"))?;
//!         Ok(Self { store, lin })
//!     }
//! }
//!
//! impl Model for LogReg {
//!     fn store(&self) -> &ParamStore { &self.store }
//!     fn forward(&self, xs: &Tensor, _ctx: &mut ModelCtx) -> Result<Tensor> {
//!         candle_nn::Module::forward(&self.lin, xs)
//!     }
//! }
//!
//! let model = LogReg::new(7, 4, 3).unwrap();
//! let names: Vec<String> = model.store().params().iter().map(|p| p.name.clone()).collect();
//! assert_eq!(names, ["fc.bias", "fc.weight"]);
//! ```

pub mod alloc;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod io;
pub mod model;
pub mod quant;
pub mod rng;
pub mod train;
pub mod tune;

pub use error::{Error, Result};

/// The wick version recorded in every run directory.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
