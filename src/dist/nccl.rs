//! NCCL ranks (cargo feature `nccl`): one GPU per rank, through candle's cudarc.
//!
//! The communicator reduces the same host buffers as the other backends (the trainer's
//! gradients live in host memory): each collective copies the buffer to a device buffer kept
//! between calls, runs the NCCL collective on the device's stream, and copies the result back.
//! f32 and f64 are reduced natively (candle's own NCCL example handles only bf16/f16).
//!
//! The world and the NCCL unique id come from MPI when the process runs under `mpirun` (and
//! wick has the `mpi` feature), otherwise from `WICK_RANK` / `WICK_WORLD_SIZE` and a
//! rendezvous file (`dist.rendezvous`) that rank 0 writes and the others read.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};

use super::Communicator;
use crate::config::DistConfig;
use crate::{Error, Result};

/// The NCCL communicator.
pub struct Nccl {
    rank: usize,
    world: usize,
    inner: Mutex<Inner>,
    /// The MPI world the id came through, kept for `abort` (and finalized last).
    #[cfg(feature = "mpi")]
    _mpi: Option<super::mpi::Mpi>,
}

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
    bufs: DeviceBuffers,
}

/// Device buffers kept between collectives, one per element type.
#[derive(Default)]
struct DeviceBuffers {
    f32s: Option<CudaSlice<f32>>,
    f64s: Option<CudaSlice<f64>>,
    bytes: Option<CudaSlice<u8>>,
}

/// An element type the communicator carries, and its buffer.
trait Element: DeviceRepr + ValidAsZeroBits + NcclType + Copy {
    fn slot(bufs: &mut DeviceBuffers) -> &mut Option<CudaSlice<Self>>;
}

impl Element for f32 {
    fn slot(bufs: &mut DeviceBuffers) -> &mut Option<CudaSlice<Self>> {
        &mut bufs.f32s
    }
}

impl Element for f64 {
    fn slot(bufs: &mut DeviceBuffers) -> &mut Option<CudaSlice<Self>> {
        &mut bufs.f64s
    }
}

impl Element for u8 {
    fn slot(bufs: &mut DeviceBuffers) -> &mut Option<CudaSlice<Self>> {
        &mut bufs.bytes
    }
}

/// The two collectives everything else is built from.
#[derive(Clone, Copy)]
enum Collective {
    Sum,
    Broadcast(usize),
}

// SAFETY: the NCCL communicator and its stream are only used under `inner`'s lock, one call at
// a time, which NCCL allows from any thread.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Dist(format!("NCCL {what} failed: {e:?}"))
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Dist(format!("CUDA {what} failed: {e:?}"))
}

impl Nccl {
    /// Joins the world described by the environment (see the module docs), on GPU
    /// `local rank % visible GPUs`.
    pub fn init(cfg: &DistConfig) -> Result<Self> {
        #[cfg(feature = "mpi")]
        let mpi = match super::launched_world() {
            Some(_) => Some(super::mpi::Mpi::init(cfg.timeout_s)?),
            None => None,
        };
        #[cfg(feature = "mpi")]
        let (rank, world) = match &mpi {
            Some(m) => (m.rank(), m.world()),
            None => env_world()?,
        };
        #[cfg(not(feature = "mpi"))]
        let (rank, world) = match super::launched_world() {
            Some(_) => {
                return Err(Error::Config(
                    "dist.backend = \"nccl\" under mpirun needs a wick built with `--features nccl,mpi` (the NCCL id travels over MPI)".into(),
                ))
            }
            None => env_world()?,
        };
        let device = candle_core::Device::new_cuda(super::rank_gpu(rank)?)?;
        let stream = device.as_cuda_device()?.cuda_stream();

        let mut id_bytes = [0u8; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        #[cfg(feature = "mpi")]
        let via_mpi = mpi.as_ref();
        #[cfg(not(feature = "mpi"))]
        let via_mpi: Option<&dyn Communicator> = None;
        let rendezvous = match via_mpi {
            Some(m) => {
                m.broadcast_bytes(&mut id_bytes, 0)?;
                None
            }
            None if world > 1 => {
                let file = cfg.rendezvous.clone().ok_or_else(|| {
                    Error::Config(
                        "dist.backend = \"nccl\" with WICK_WORLD_SIZE > 1 outside mpirun needs dist.rendezvous = a file path every rank can see (rank 0 writes the NCCL id there)".into(),
                    )
                })?;
                exchange_id(&file, rank, &mut id_bytes, cfg.timeout_s)?;
                Some(file)
            }
            None => None,
        };
        let mut internal = [0 as std::os::raw::c_char; 128];
        for (c, b) in internal.iter_mut().zip(id_bytes) {
            *c = b as std::os::raw::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| nccl_err("communicator init", e))?;
        // Every rank has joined: the id file has served.
        if let (Some(f), 0) = (rendezvous, rank) {
            let _ = std::fs::remove_file(f);
        }
        Ok(Self {
            rank,
            world,
            inner: Mutex::new(Inner {
                comm,
                stream,
                bufs: DeviceBuffers::default(),
            }),
            #[cfg(feature = "mpi")]
            _mpi: mpi,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` on `buf` through the device buffer of its element type.
    fn run<T: Element>(&self, buf: &mut [T], op: Collective) -> Result<()> {
        let mut g = self.lock();
        let Inner { comm, stream, bufs } = &mut *g;
        through_device(stream, T::slot(bufs), buf, |d| {
            match op {
                Collective::Sum => comm
                    .all_reduce_in_place(d, &ReduceOp::Sum)
                    .map_err(|e| nccl_err("all-reduce", e)),
                Collective::Broadcast(root) => comm
                    .broadcast_in_place(d, root as i32)
                    .map_err(|e| nccl_err("broadcast", e)),
            }
            .map(|_| ())
        })
    }
}

/// `WICK_RANK` and `WICK_WORLD_SIZE` (default: rank 0 of 1).
fn env_world() -> Result<(usize, usize)> {
    let get = |k: &str, default: usize| -> Result<usize> {
        match std::env::var(k) {
            Ok(v) => v.parse().map_err(|_| {
                Error::Config(format!("{k} = {v:?}: expected a non-negative integer"))
            }),
            Err(_) => Ok(default),
        }
    };
    let (rank, world) = (get("WICK_RANK", 0)?, get("WICK_WORLD_SIZE", 1)?);
    if world == 0 || rank >= world {
        return Err(Error::Config(format!(
            "WICK_RANK = {rank} with WICK_WORLD_SIZE = {world}: expected 0 ≤ rank < world size"
        )));
    }
    Ok((rank, world))
}

/// Rank 0 writes the id to `file` (atomically); the others wait for a copy written after they
/// started (an older file is a previous job's) for at most `timeout_s`.
fn exchange_id(file: &Path, rank: usize, id: &mut [u8; 128], timeout_s: f64) -> Result<()> {
    if rank == 0 {
        let tmp = PathBuf::from(format!("{}.tmp", file.display()));
        std::fs::write(&tmp, &id[..]).map_err(|e| Error::io(&tmp, e))?;
        return std::fs::rename(&tmp, file).map_err(|e| Error::io(file, e));
    }
    let started = SystemTime::now() - Duration::from_secs(60);
    let t0 = Instant::now();
    loop {
        let fresh = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= started);
        if fresh {
            if let Ok(bytes) = std::fs::read(file) {
                if bytes.len() == 128 {
                    id.copy_from_slice(&bytes);
                    return Ok(());
                }
            }
        }
        if t0.elapsed().as_secs_f64() > timeout_s {
            return Err(Error::Dist(format!(
                "{}: rank 0 did not write the NCCL id within dist.timeout_s = {timeout_s} s; start rank 0, or check that every rank sees this path",
                file.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies `buf` to the device buffer in `slot` (grown as needed), runs `op` on it, copies back.
fn through_device<T: Element>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    buf: &mut [T],
    op: impl FnOnce(&mut CudaSlice<T>) -> Result<()>,
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    if slot.as_ref().is_none_or(|s| s.len() != buf.len()) {
        *slot = Some(
            stream
                .alloc_zeros::<T>(buf.len())
                .map_err(|e| cuda_err("alloc", e))?,
        );
    }
    let dev = slot.as_mut().expect("allocated above");
    stream
        .memcpy_htod(buf, dev)
        .map_err(|e| cuda_err("copy to device", e))?;
    op(dev)?;
    stream
        .memcpy_dtoh(dev, buf)
        .map_err(|e| cuda_err("copy to host", e))?;
    stream.synchronize().map_err(|e| cuda_err("synchronize", e))
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.run(buf, Collective::Sum)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.run(buf, Collective::Sum)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.run(buf, Collective::Broadcast(root))
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.run(buf, Collective::Broadcast(root))
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }

    fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self._mpi {
            m.abort(code)
        }
        std::process::exit(code)
    }
}
