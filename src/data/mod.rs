//! Datasets and batching.
//!
//! [`table`] reads CSV tables into an in-memory [`Dataset`] plus its [`Schema`] (feature
//! names, classes, standardization statistics); [`loader`] turns a dataset into seeded,
//! resumable mini-batches.

pub mod loader;
pub mod table;

pub use loader::{Batch, BatchPlan};
pub use table::{load_split, Dataset, Schema, Targets};
