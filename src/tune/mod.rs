//! Hyper-parameter tuning: a define-by-run [`Study`] / [`Trial`] API over any objective, the
//! TPE sampler (after Optuna's), random sampling, and median / successive-halving pruners.

pub mod journal;
pub mod pruner;
pub mod report;
pub mod runner;
pub mod space;
pub mod study;
pub mod tpe;

pub use pruner::{MedianPruner, Pruner, SuccessiveHalvingPruner};
pub use space::Distribution;
pub use study::{
    Direction, FrozenTrial, RandomSampler, Sampler, Study, Trial, TrialError, TrialState,
};
pub use tpe::TpeSampler;
