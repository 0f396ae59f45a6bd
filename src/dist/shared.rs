//! Gradient memory that every rank on one machine maps, so that the gradient all-reduce reads
//! each rank's gradients where its backward pass wrote them.
//!
//! The window all-reduce (`shm.rs`, MPI ranks on one machine) first copies a rank's values
//! into its slot of a shared window: 16–33 µs a step for the digits MLP's 0.34 MB on a 2-vCPU
//! VM, since every line of the slot must first be taken back from the core that read it last.
//! Here the gradients themselves live in shared memory (the [`super::GradReducer`] moves the
//! [`crate::model::Grads`] there on its first all-reduce). Backward accumulates into this
//! rank's current buffer; the all-reduce, after one timed barrier, adds every rank's current
//! buffer in rank order into this rank's *other* buffer, which becomes the current one (the
//! window's sums in the window's order, so the same bits). The optimizer reads the mean from
//! there, and the next backward accumulates into it after [`crate::model::Grads::zero`].
//! Backward's first writes still take the lines back, but overlapped with its arithmetic:
//! on that VM the 2-rank MLP at batch 32 per rank went from 19% to 13% of its step
//! communicating (`docs/PERFORMANCE.md`).
//!
//! Why the two buffers are safe: after barrier `k` a rank reads the others' buffer `k mod 2`
//! until it reaches barrier `k + 1`. Its owner writes that buffer again only after barrier
//! `k + 1` (the mean of all-reduce `k + 1` goes there), which it passes only once every rank,
//! the slow reader included, has arrived, so it is done reading.
//!
//! The memory is a file in `/dev/shm` that rank 0 creates, every rank maps, and rank 0
//! unlinks as soon as all have mapped it, or when an error or panic ends the setup first (only
//! a process killed in between leaves it behind). Its pages are allocated when it is created,
//! so a full `/dev/shm` means the slower path for every rank, not a bus error at the first
//! write. Each rank's mapping is its own, so ranks may drop their gradients at different
//! times.

use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::Communicator;
use crate::Result;

/// Where the file goes: memory, not disk.
const SHM_DIR: &str = "/dev/shm";

/// Values between the starts of two buffers are rounded up to 128 bytes, so that no cache line
/// (or the pair the adjacent-line prefetcher fetches) holds values of two ranks.
const ALIGN: usize = 32;

/// The mapping: for every rank, two buffers of `len` values, `stride` apart.
struct Slots {
    map: MmapRaw,
    rank: usize,
    world: usize,
    len: usize,
    stride: usize,
}

impl Slots {
    /// The start of buffer `turn` of rank `q`.
    fn ptr(&self, q: usize, turn: usize) -> *mut f32 {
        debug_assert!(q < self.world && turn < 2);
        // SAFETY: the mapping holds `world × 2 × stride` values (checked in `map`).
        unsafe { (self.map.as_mut_ptr() as *mut f32).add((2 * q + turn) * self.stride) }
    }
}

/// This rank's gradients in memory every rank on the machine maps (see the module docs).
pub struct SharedGrads {
    slots: Arc<Slots>,
    /// Which of this rank's two buffers holds its gradients now.
    turn: usize,
}

impl SharedGrads {
    /// Values per buffer.
    pub fn len(&self) -> usize {
        self.slots.len
    }

    pub fn is_empty(&self) -> bool {
        self.slots.len == 0
    }

    /// The start of this rank's current buffer. Valid for [`SharedGrads::len`] values while
    /// `self` lives; no other rank reads it before the next all-reduce.
    pub fn current(&self) -> *mut f32 {
        self.slots.ptr(self.slots.rank, self.turn)
    }

    /// Replaces this rank's current buffer by the mean over the ranks of theirs: waits at
    /// `barrier` (the communicator's timed one) for every rank's gradients, then adds them in
    /// rank order into the other buffer, which becomes the current one. Collective.
    pub(crate) fn reduce_mean(&mut self, barrier: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let s = &*self.slots;
        let (cur, next) = (self.turn, self.turn ^ 1);
        // This rank's gradients are written before the barrier, the others' read after it.
        fence(Ordering::SeqCst);
        barrier()?;
        fence(Ordering::SeqCst);
        let scale = 1.0 / s.world as f32;
        // SAFETY: see the module docs. Every rank's buffer `cur` is final (its owner passed the
        // barrier) and stays unchanged until the next barrier; this rank's buffer `next` is
        // read by no other rank until then (they finished the previous all-reduce's reads
        // before arriving at this barrier) and is distinct from every buffer `cur`.
        let dst = unsafe { std::slice::from_raw_parts_mut(s.ptr(s.rank, next), s.len) };
        let src = |q: usize| -> &[f32] {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(s.ptr(q, cur), s.len) }
        };
        let srcs: Vec<&[f32]> = (0..s.world).map(src).collect();
        sum_scaled(dst, &srcs, scale);
        self.turn = next;
        Ok(())
    }
}

/// `dst[i] = (srcs[0][i] + srcs[1][i] + …) × scale`, added in the order of `srcs` (rank
/// order), so every rank that sums the same slices gets the same bits. The window all-reduce
/// (`shm.rs`) and [`SharedGrads`] both sum through it.
pub(crate) fn sum_scaled(dst: &mut [f32], srcs: &[&[f32]], scale: f32) {
    if let [a, b] = srcs {
        // Two ranks (the common case) in one vectorisable pass.
        for ((v, a), b) in dst.iter_mut().zip(*a).zip(*b) {
            *v = (a + b) * scale;
        }
        return;
    }
    for (i, v) in dst.iter_mut().enumerate() {
        let mut sum = srcs[0][i];
        for r in &srcs[1..] {
            sum += r[i];
        }
        *v = sum * scale;
    }
}

/// Shared gradient memory for `len` values per rank, or `None` when it cannot be set up
/// here (no `/dev/shm`, or a rank could not map the file), in which case every rank gets
/// `None`. Collective: every rank calls it with the same `len`, and only when all ranks are on
/// this machine.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn create(comm: &dyn Communicator, len: usize) -> Result<Option<SharedGrads>> {
    let (rank, world) = (comm.rank(), comm.world());
    let stride = len.div_ceil(ALIGN) * ALIGN;
    let bytes = world * 2 * stride * std::mem::size_of::<f32>();
    // Rank 0 creates the file and sends its path (empty: none).
    let mut name = [0u8; 256];
    let mut file = None;
    // Rank 0's hold on the file: it goes when this function returns, however it returns.
    let mut _unlink = None;
    // Without it (no room in /dev/shm, or none), every rank falls back to the window
    // all-reduce.
    if rank == 0 {
        match create_file(Path::new(SHM_DIR), bytes) {
            Ok((path, f)) => {
                // A name of about 50 bytes: `/dev/shm/wick-grads-PID-NANOS`.
                let p = path.as_os_str().as_encoded_bytes();
                if p.len() <= name.len() {
                    name[..p.len()].copy_from_slice(p);
                    file = Some(f);
                }
                _unlink = Some(Unlink(path));
            }
            Err(e) => fallback_note(rank, &format!("{SHM_DIR}: {e}")),
        }
    }
    comm.broadcast_bytes(&mut name, 0)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    if end == 0 {
        return Ok(None);
    }
    let path = PathBuf::from(String::from_utf8_lossy(&name[..end]).into_owned());
    let mapped = map(&path, file, bytes);
    if let Err(e) = &mapped {
        fallback_note(rank, &format!("{}: {e}", path.display()));
    }
    // Every rank has mapped the file (or failed to) once this returns.
    let mut failed = [mapped.is_err() as u8 as f64];
    comm.all_reduce_sum_f64(&mut failed)?;
    match mapped {
        Ok(map) if failed[0] == 0.0 => Ok(Some(SharedGrads {
            slots: Arc::new(Slots {
                map,
                rank,
                world,
                len,
                stride,
            }),
            turn: 0,
        })),
        _ => Ok(None),
    }
}

/// Removes a file when dropped.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One line on standard error from a rank that could not set up the shared gradients: the
/// job goes on, slower, through the window all-reduce.
fn fallback_note(rank: usize, why: &str) {
    eprintln!(
        "note: rank {rank}: gradients stay out of shared memory ({why}); training goes on with the \
         slower copying all-reduce. To fix, free space in {SHM_DIR} or make it larger (`df -h {SHM_DIR}`; \
         Docker: --shm-size)"
    );
}

/// A new zero-filled file of `bytes` bytes in `dir`, under a name no other job uses, with its
/// pages allocated (so that running out of memory there is an error now, not a `SIGBUS` at the
/// first write through a mapping).
fn create_file(dir: &Path, bytes: usize) -> std::io::Result<(PathBuf, std::fs::File)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = dir.join(format!("wick-grads-{}-{nanos}", std::process::id()));
    use std::os::unix::fs::OpenOptionsExt;
    // Readable by this user only: it holds the gradients until every rank has mapped it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor this function owns.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, bytes as libc::off_t) };
    if rc != 0 {
        let _ = std::fs::remove_file(&path);
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok((path, f))
}

/// Maps `path` (or `file`, when this rank created it), which must hold `bytes` bytes.
fn map(path: &Path, file: Option<std::fs::File>, bytes: usize) -> std::io::Result<MmapRaw> {
    let f = match file {
        Some(f) => f,
        None => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?,
    };
    let have = f.metadata()?.len();
    if have != bytes as u64 {
        return Err(std::io::Error::other(format!(
            "{} has {have} bytes, not {bytes}",
            path.display()
        )));
    }
    MmapOptions::new().len(bytes).map_raw(&f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `world` ranks as threads of this process, each with its own mapping of one file.
    fn ranks(dir: &Path, world: usize, len: usize) -> Vec<SharedGrads> {
        let stride = len.div_ceil(ALIGN) * ALIGN;
        let bytes = world * 2 * stride * 4;
        let (path, f) = create_file(dir, bytes).unwrap();
        let mut file = Some(f);
        let out = (0..world)
            .map(|rank| SharedGrads {
                slots: Arc::new(Slots {
                    map: map(&path, file.take(), bytes).unwrap(),
                    rank,
                    world,
                    len,
                    stride,
                }),
                turn: 0,
            })
            .collect();
        std::fs::remove_file(&path).unwrap();
        out
    }

    #[test]
    fn every_rank_gets_the_same_mean_step_after_step() {
        let dir = std::env::temp_dir();
        for world in [2, 3] {
            let len = 1000;
            let barrier = std::sync::Barrier::new(world);
            let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
                let handles: Vec<_> = ranks(&dir, world, len)
                    .into_iter()
                    .map(|mut g| {
                        let barrier = &barrier;
                        scope.spawn(move || {
                            let rank = g.slots.rank;
                            let mut means = Vec::new();
                            for step in 0..6 {
                                // SAFETY: this rank's current buffer (module docs).
                                let cur =
                                    unsafe { std::slice::from_raw_parts_mut(g.current(), len) };
                                // Backward adds into the buffer the previous mean left there.
                                for (i, v) in cur.iter_mut().enumerate() {
                                    *v = *v * 0.5 + (rank * 7 + i * 3 + step) as f32 * 0.1;
                                }
                                g.reduce_mean(&mut || {
                                    barrier.wait();
                                    Ok(())
                                })
                                .unwrap();
                                let cur = unsafe { std::slice::from_raw_parts(g.current(), len) };
                                means.push(cur.to_vec());
                            }
                            means
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            // The same sums in one process: every rank's values, added in rank order.
            let mut state = vec![vec![0f32; len]; world];
            for step in 0..6 {
                for (rank, st) in state.iter_mut().enumerate() {
                    for (i, v) in st.iter_mut().enumerate() {
                        *v = *v * 0.5 + (rank * 7 + i * 3 + step) as f32 * 0.1;
                    }
                }
                let want: Vec<f32> = (0..len)
                    .map(|i| {
                        let mut sum = state[0][i];
                        for st in &state[1..] {
                            sum += st[i];
                        }
                        sum * (1.0 / world as f32)
                    })
                    .collect();
                for (rank, r) in results.iter().enumerate() {
                    assert_eq!(r[step], want, "world {world}, rank {rank}, step {step}");
                }
                for st in state.iter_mut() {
                    st.copy_from_slice(&want);
                }
            }
        }
    }

    /// Rank 0 of two, whose collectives fail from the `fail_at`-th on (0: the broadcast of
    /// the file's name, 1: the all-reduce of mapping failures), as when the other rank dies
    /// during the setup. It keeps the name rank 0 broadcast.
    struct FailingPeer {
        fail_at: usize,
        calls: std::sync::atomic::AtomicUsize,
        sent: std::sync::Mutex<Vec<u8>>,
    }

    impl FailingPeer {
        fn call(&self) -> Result<()> {
            if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_at {
                return Err(crate::Error::Dist("rank 1 did not arrive".into()));
            }
            Ok(())
        }
    }

    impl Communicator for FailingPeer {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "test"
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
            self.call()
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
            self.call()
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
            self.call()
        }
        fn broadcast_bytes(&self, buf: &mut [u8], _: usize) -> Result<()> {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            *self.sent.lock().unwrap() = buf[..end].to_vec();
            self.call()
        }
        fn barrier(&self) -> Result<()> {
            self.call()
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort({code})")
        }
    }

    #[test]
    fn rank_0_removes_the_file_however_the_setup_ends() {
        if !Path::new(SHM_DIR).is_dir() {
            return; // Not Linux: `create` falls back without a file.
        }
        for fail_at in [0, 1, usize::MAX] {
            let comm = FailingPeer {
                fail_at,
                calls: Default::default(),
                sent: Default::default(),
            };
            let got = create(&comm, 1000);
            let sent = comm.sent.lock().unwrap().clone();
            let path = PathBuf::from(String::from_utf8(sent).unwrap());
            assert!(
                path.starts_with(SHM_DIR) && path.to_string_lossy().contains("wick-grads-"),
                "{path:?}"
            );
            match fail_at {
                usize::MAX => assert!(matches!(got, Ok(Some(_)))),
                _ => assert!(got.is_err(), "fail_at {fail_at}"),
            }
            assert!(
                !path.exists(),
                "fail_at {fail_at}: {path:?} was left behind"
            );
        }
    }

    #[test]
    fn the_file_has_its_pages_before_anyone_maps_it() {
        use std::os::unix::fs::MetadataExt;
        // tmpfs, where a file only sized with `set_len` gets its pages at the first write.
        let dir = if Path::new(SHM_DIR).is_dir() {
            PathBuf::from(SHM_DIR)
        } else {
            std::env::temp_dir()
        };
        let bytes = 3 << 20;
        let (path, f) = create_file(&dir, bytes).unwrap();
        let meta = f.metadata().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(meta.len(), bytes as u64);
        assert!(
            meta.blocks() * 512 >= bytes as u64,
            "{} bytes allocated of {bytes}",
            meta.blocks() * 512
        );
    }

    #[test]
    fn no_file_is_left_in_a_directory_that_does_not_exist() {
        // Rank 0 without /dev/shm: the error that makes every rank fall back, no panic.
        let err = create_file(Path::new("/nonexistent-wick-dir"), 64).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
