//! Training: the [`Trainer`] loop and the small parts it is built from.
//!
//! - [`optim`]: SGD and AdamW, in place, with saveable state; global-norm clipping;
//! - [`schedule`]: warm-up, then constant, step, cosine or linear decay;
//! - [`metrics`]: loss, accuracy, macro-F1, MSE, MAE;
//! - [`callback`]: hooks (loggers, progress, pruning, gradient all-reduce);
//! - [`checkpoint`]: atomic `last`/`best` checkpoints with exact resume;
//! - [`run_dir`]: the run directory, its metrics files and summary;
//! - [`progress`], [`plot`]: what the user sees.

pub mod callback;
pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod run_dir;
pub mod schedule;
mod trainer;

pub use callback::{Callback, Control};
pub use run_dir::{RunDir, Summary};
pub use trainer::{predict, Trainer};
