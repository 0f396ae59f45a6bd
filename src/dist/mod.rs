//! Data-parallel training: the [`Communicator`] that connects ranks, and the parts of DDP
//! built on it.
//!
//! - [`local`]: world 1, no communication (the default);
//! - `mpi` (cargo feature `mpi`): CPU ranks on one or many machines, through OpenMPI;
//! - `nccl` (cargo feature `nccl`): one GPU per rank;
//! - [`ddp`]: parameter broadcast, bucketed gradient all-reduce, metric reduction.
//!
//! Every rank runs the same trainer on its share of each global batch (see
//! [`crate::data::BatchPlan::for_rank`]); after backward the gradients are averaged across
//! ranks, so every rank takes the identical optimizer step, as with one batch `world` times
//! larger.

pub mod ddp;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shared;
#[cfg(feature = "mpi")]
pub mod shm;

use std::sync::Arc;

use crate::config::{DistBackend, DistConfig};
use crate::{Error, Result};

pub use ddp::GradReducer;
pub use local::Local;

/// What connects the ranks of a data-parallel job. Collectives must be called by every rank
/// in the same order. They fail, rather than wait forever, when a rank does not arrive within
/// the communicator's timeout; the error names the missing ranks.
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// The engine's name: `local`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    /// Element-wise sum over all ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over all ranks of `send`, written to `recv` (of the same length).
    fn all_reduce_sum_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        self.all_reduce_sum(recv)
    }
    /// Element-wise mean over all ranks of `parts` taken end to end, in place, or `None` when
    /// this backend has no way to do it without packing them into one buffer (the caller then
    /// packs buckets). Collective: every rank passes parts of the same lengths.
    fn all_reduce_mean_parts(&self, parts: &mut [&mut [f32]]) -> Option<Result<()>> {
        let _ = parts;
        None
    }
    /// Memory for this rank's `len` gradient values that every rank can read directly
    /// ([`shared`]), or `None` when this backend has none (the default). Collective: every
    /// rank passes the same `len`.
    fn shared_grads(&self, len: usize) -> Option<Result<shared::SharedGrads>> {
        let _ = len;
        None
    }
    /// The mean over all ranks of `grads`, which [`Communicator::shared_grads`] made.
    /// Collective.
    fn all_reduce_mean_shared(&self, grads: &mut shared::SharedGrads) -> Result<()> {
        grads.reduce_mean(&mut || self.barrier())
    }
    /// Element-wise sum over all ranks, in place, in f64 (for metrics and counters).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank receives `root`'s `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Every rank receives `root`'s bytes.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends the whole job at once (every rank), with exit status `code`. Used after an error
    /// on one rank, which the others would otherwise wait for until their timeout.
    fn abort(&self, code: i32) -> !;

    /// Whether this rank writes logs and checkpoints.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Element-wise mean over all ranks, in place.
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let inv = 1.0 / self.world() as f32;
        if self.world() > 1 {
            buf.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }

    /// `root`'s string on every rank.
    fn broadcast_string(&self, s: &str, root: usize) -> Result<String> {
        let mut len = (s.len() as u64).to_le_bytes();
        self.broadcast_bytes(&mut len, root)?;
        let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
        if self.rank() == root {
            bytes.copy_from_slice(s.as_bytes());
        }
        self.broadcast_bytes(&mut bytes, root)?;
        String::from_utf8(bytes)
            .map_err(|_| Error::Dist(format!("rank {root} broadcast a string that is not UTF-8")))
    }
}

/// The world this process was started in, as the launcher's environment describes it:
/// `(rank, world, ranks on this machine)`. `None` outside `mpirun`.
pub fn launched_world() -> Option<(usize, usize, usize)> {
    let var = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok()?.parse::<usize>().ok())
    };
    let world = var(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"])?;
    let rank = var(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]).unwrap_or(0);
    let local = var(&["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]).unwrap_or(world);
    Some((rank, world, local.max(1)))
}

/// The GPU of a rank: its rank among the ranks on its machine (`rank` when the launcher does
/// not say) modulo the GPUs visible, so that N ranks on an N-GPU machine use them all.
#[cfg(feature = "cuda")]
pub fn rank_gpu(rank: usize) -> Result<usize> {
    let local = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(rank);
    let gpus = candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Config(format!("counting the GPUs failed: {e:?}")))?
        as usize;
    if gpus == 0 {
        return Err(Error::Config(
            "no GPU is visible; set run.device = \"cpu\" (and dist.backend = \"mpi\" for CPU ranks)"
                .into(),
        ));
    }
    Ok(local % gpus)
}

/// The communicator `cfg` asks for. `auto` means MPI when this process was started by
/// `mpirun` (or `wick launch`) with more than one rank, else local.
pub fn init(cfg: &DistConfig) -> Result<Arc<dyn Communicator>> {
    let launched = launched_world();
    let backend = match cfg.backend {
        DistBackend::Auto => match launched {
            Some((_, w, _)) if w > 1 => DistBackend::Mpi,
            _ => DistBackend::Local,
        },
        b => b,
    };
    match backend {
        DistBackend::Auto | DistBackend::Local => {
            if let Some((_, w, _)) = launched.filter(|l| l.1 > 1) {
                if cfg.backend == DistBackend::Local {
                    return Err(Error::Config(format!(
                        "dist.backend = \"local\" but this process is one of {w} MPI ranks; set dist.backend = \"mpi\" (or \"auto\"), or run without mpirun"
                    )));
                }
            }
            Ok(Arc::new(Local))
        }
        DistBackend::Mpi => mpi_comm(cfg),
        DistBackend::Nccl => nccl_comm(cfg),
    }
}

#[cfg(feature = "mpi")]
fn mpi_comm(cfg: &DistConfig) -> Result<Arc<dyn Communicator>> {
    Ok(Arc::new(mpi::Mpi::init(cfg.timeout_s)?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_comm(_cfg: &DistConfig) -> Result<Arc<dyn Communicator>> {
    Err(Error::Config(
        "dist.backend = \"mpi\" (or a run under mpirun) needs a wick built with MPI: `cargo install --path . --features mpi` after `apt install libopenmpi-dev openmpi-bin libclang-dev`".into(),
    ))
}

#[cfg(feature = "nccl")]
fn nccl_comm(cfg: &DistConfig) -> Result<Arc<dyn Communicator>> {
    Ok(Arc::new(nccl::Nccl::init(cfg)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_comm(_cfg: &DistConfig) -> Result<Arc<dyn Communicator>> {
    Err(Error::Config(
        "dist.backend = \"nccl\" needs a wick built with NCCL: `cargo install --path . --features nccl,mpi` on a machine with CUDA".into(),
    ))
}
