//! MPI ranks (OpenMPI, through the `mpi` crate): CPU processes on one or many machines.
//!
//! Every collective is started non-blocking and polled against a deadline, so a rank that died
//! or hangs stops the others with an error instead of a hang. To name the failed rank:
//!
//! - each rank sends every peer a small arrival token (the collective's sequence number) as it
//!   enters a collective: when the deadline passes, the peers whose token has not come never
//!   reached it;
//! - if every peer arrived, the waiting rank pings them all: a rank waiting in a collective
//!   answers pings, so the peers that stay silent for `PING_GRACE` (2 s) are the ones that
//!   died or hang inside the collective.

use std::os::raw::{c_int, c_void};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mpi::environment::Universe;
use mpi::ffi;
use mpi::Threading;

use super::shm::Shm;
use super::Communicator;
use crate::{Error, Result};

/// Tag of the arrival tokens (collectives do not use tags).
const ARRIVAL_TAG: c_int = 0x5717;
/// OpenMPI's MCA parameter for the algorithm of `MPI_Iallreduce` (1 = ring).
const RING_VAR: &str = "OMPI_MCA_coll_libnbc_iallreduce_algorithm";
/// Tags of the liveness pings and their answers.
const PING_TAG: c_int = 0x5718;
const PONG_TAG: c_int = 0x5719;
/// How long a rank waits for the answers to its pings.
const PING_GRACE: Duration = Duration::from_secs(2);
/// Polls before the waiting rank starts to sleep between polls.
const SPIN_POLLS: u32 = 20_000;

/// The MPI communicator: `MPI_COMM_WORLD`, with a timeout on every collective.
pub struct Mpi {
    /// Finalizes MPI when dropped.
    _universe: Universe,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// MPI calls are serialized through this lock (MPI_THREAD_SERIALIZED).
    state: Mutex<State>,
}

struct State {
    /// Collectives entered so far.
    seq: u64,
    /// The token this rank sends (its address must stay valid until the send completes).
    token: Box<u64>,
    /// Tokens received, one slot per peer.
    arrived: Vec<u64>,
    /// The send copy of in-place f32 all-reduces.
    send: Vec<f32>,
    /// The standing receive for pings from any peer, and its buffer.
    ping: ffi::MPI_Request,
    ping_in: Box<u64>,
    /// What this rank sends as pings and answers.
    ping_out: Box<u64>,
    /// Answers received, one slot per peer.
    pongs: Vec<u64>,
    /// The shared-memory all-reduce of f32, when every rank is on this machine.
    shm: Option<Shm>,
}

// SAFETY: every MPI call goes through `state`'s lock, and MPI is initialised with
// MPI_THREAD_SERIALIZED, which allows calls from any thread one at a time. `Universe` only
// holds an optional attached buffer that is never touched after initialisation.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

fn world_comm() -> ffi::MPI_Comm {
    // SAFETY: a constant handle set up by MPI_Init.
    unsafe { ffi::RSMPI_COMM_WORLD }
}

fn null_request() -> ffi::MPI_Request {
    // SAFETY: a constant handle.
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

/// An MPI return code as a result naming the call.
pub(super) fn check(what: &str, code: c_int) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Dist(format!(
            "MPI {what} failed with error code {code}"
        )))
    }
}

impl Mpi {
    /// Initialises MPI. Collectives wait at most `timeout_s` seconds for the other ranks.
    pub fn init(timeout_s: f64) -> Result<Self> {
        let timeout = Duration::try_from_secs_f64(timeout_s)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                Error::Config(format!(
                    "dist.timeout_s = {timeout_s}: expected a positive number of seconds, e.g. 300"
                ))
            })?;
        // OpenMPI's non-blocking all-reduce picks its algorithm by message size; for gradient
        // buckets the ring, bandwidth-optimal as in NCCL and Horovod, is 1.6× faster (45 MB
        // over 2 ranks of one machine: 16 ms against 27 ms; such ranks now use the shared-memory
        // window, the ring is for ranks on several machines). A value the user set wins.
        if std::env::var_os(RING_VAR).is_none() {
            std::env::set_var(RING_VAR, "1");
        }
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            return Err(Error::Dist(
                "MPI is already initialised in this process; create one communicator per process"
                    .into(),
            ));
        };
        if threading < Threading::Serialized {
            return Err(Error::Dist(format!(
                "this MPI library offers thread support {threading:?}, wick needs Serialized; use OpenMPI 4 or newer"
            )));
        }
        let (mut rank, mut world) = (0 as c_int, 0 as c_int);
        // SAFETY: MPI is initialised; the out-pointers are valid.
        unsafe {
            check("rank", ffi::MPI_Comm_rank(world_comm(), &mut rank))?;
            check("size", ffi::MPI_Comm_size(world_comm(), &mut world))?;
        }
        let mut st = State {
            seq: 0,
            token: Box::new(0),
            arrived: vec![0; world as usize],
            send: Vec::new(),
            ping: null_request(),
            ping_in: Box::new(0),
            ping_out: Box::new(0),
            pongs: vec![0; world as usize],
            shm: Shm::new(world_comm(), rank as usize, world as usize)?,
        };
        post_ping_receive(&mut st)?;
        Ok(Self {
            _universe: universe,
            rank: rank as usize,
            world: world as usize,
            timeout,
            state: Mutex::new(st),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one collective: `start` posts it (non-blocking) into the request it is given.
    /// Returns when it completed on this rank, or fails once the timeout passes, naming the
    /// ranks whose arrival token did not come.
    fn collective(
        &self,
        st: &mut State,
        what: &str,
        start: impl FnOnce(&mut ffi::MPI_Request) -> c_int,
    ) -> Result<()> {
        st.seq += 1;
        *st.token = st.seq;
        let comm = world_comm();
        let peers: Vec<usize> = (0..self.world).filter(|&p| p != self.rank).collect();
        let mut reqs = vec![null_request(); 1 + 2 * peers.len()];
        // SAFETY: the token, the arrival slots and the collective's buffers (borrowed by the
        // caller for the duration of this call) stay valid until every request completes; on
        // a timeout the job is aborted, never resumed with requests in flight.
        unsafe {
            check(what, start(&mut reqs[0]))?;
            for (i, &p) in peers.iter().enumerate() {
                check(
                    "send",
                    ffi::MPI_Isend(
                        &*st.token as *const u64 as *const c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        ARRIVAL_TAG,
                        comm,
                        &mut reqs[1 + i],
                    ),
                )?;
                check(
                    "receive",
                    ffi::MPI_Irecv(
                        st.arrived.as_mut_ptr().add(p) as *mut c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        ARRIVAL_TAG,
                        comm,
                        &mut reqs[1 + peers.len() + i],
                    ),
                )?;
            }
        }
        if wait(st, &mut reqs, self.timeout)? {
            return Ok(());
        }
        let secs = self.timeout.as_secs_f64();
        let seq = st.seq;
        let arrivals = &reqs[1 + peers.len()..];
        let absent: Vec<usize> = (0..peers.len())
            .filter(|&i| arrivals[i] != null_request())
            .map(|i| peers[i])
            .collect();
        let (failed, how) = if absent.is_empty() {
            (self.silent_peers(st, &peers)?, "stopped responding in")
        } else {
            (absent, "did not reach")
        };
        if failed.is_empty() {
            return Err(Error::Dist(format!(
                "{what} #{seq} did not complete within dist.timeout_s = {secs} s although every rank reached it and answers; check the network between the machines"
            )));
        }
        let names: Vec<String> = failed.iter().map(|p| p.to_string()).collect();
        Err(Error::Dist(format!(
            "rank{} {} {how} {what} #{seq} (waited dist.timeout_s = {secs} s): it died or hangs. The last checkpoint is intact; fix that rank and resume with `wick train --resume RUN_DIR`",
            if names.len() > 1 { "s" } else { "" },
            names.join(", "),
        )))
    }

    /// Pings `peers` and returns those that do not answer within [`PING_GRACE`].
    fn silent_peers(&self, st: &mut State, peers: &[usize]) -> Result<Vec<usize>> {
        *st.ping_out = st.seq;
        let comm = world_comm();
        let mut reqs = vec![null_request(); 2 * peers.len()];
        // SAFETY: as in `collective`: the buffers live in `st`, which outlives the requests
        // unless the job is aborted.
        unsafe {
            for (i, &p) in peers.iter().enumerate() {
                check(
                    "ping",
                    ffi::MPI_Isend(
                        &*st.ping_out as *const u64 as *const c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        PING_TAG,
                        comm,
                        &mut reqs[i],
                    ),
                )?;
                check(
                    "receive",
                    ffi::MPI_Irecv(
                        st.pongs.as_mut_ptr().add(p) as *mut c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        PONG_TAG,
                        comm,
                        &mut reqs[peers.len() + i],
                    ),
                )?;
            }
        }
        wait(st, &mut reqs, PING_GRACE)?;
        Ok((0..peers.len())
            .filter(|&i| reqs[peers.len() + i] != null_request())
            .map(|i| peers[i])
            .collect())
    }
}

/// The element types wick's collectives carry, with their MPI datatypes.
trait Element: Copy {
    fn datatype() -> ffi::MPI_Datatype;
}

impl Element for f32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant handle.
        unsafe { ffi::RSMPI_FLOAT }
    }
}

impl Element for f64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant handle.
        unsafe { ffi::RSMPI_DOUBLE }
    }
}

impl Element for u8 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant handle.
        unsafe { ffi::RSMPI_UINT8_T }
    }
}

/// An element count as MPI takes it.
fn count(len: usize) -> Result<c_int> {
    c_int::try_from(len).map_err(|_| {
        Error::Dist(format!(
            "a collective of {len} values is over MPI's limit of {} per call",
            c_int::MAX
        ))
    })
}

impl Mpi {
    /// Element-wise sum of every rank's `send` into `recv`.
    fn all_reduce_into<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        assert_eq!(
            send.len(),
            recv.len(),
            "all-reduce buffers differ in length"
        );
        let n = count(recv.len())?;
        let mut st = self.lock();
        // SAFETY: both buffers are borrowed for the whole collective.
        self.collective(&mut st, "all-reduce", |req| unsafe {
            ffi::MPI_Iallreduce(
                send.as_ptr() as *const c_void,
                recv.as_mut_ptr() as *mut c_void,
                n,
                T::datatype(),
                ffi::RSMPI_SUM,
                world_comm(),
                req,
            )
        })
    }

    /// The all-reduce through shared memory ([`Shm`]), or `None` when the ranks are not all on
    /// this machine.
    fn shm_all_reduce(&self, send: Option<&[f32]>, recv: &mut [f32]) -> Option<Result<()>> {
        self.with_shm(|shm, barrier| shm.all_reduce(send, recv, barrier))
    }

    /// `f` on the shared-memory window, with the communicator's timed barrier; `None` when
    /// there is no window.
    fn with_shm(
        &self,
        f: impl FnOnce(&mut Shm, &mut dyn FnMut() -> Result<()>) -> Result<()>,
    ) -> Option<Result<()>> {
        let mut st = self.lock();
        let mut shm = st.shm.take()?;
        let res = f(&mut shm, &mut || self.timed_barrier(&mut st, "all-reduce"));
        st.shm = Some(shm);
        Some(res)
    }

    /// A barrier under the collectives' deadline, reported as part of `what`.
    fn timed_barrier(&self, st: &mut State, what: &str) -> Result<()> {
        // SAFETY: a barrier has no buffers.
        self.collective(st, what, |req| unsafe {
            ffi::MPI_Ibarrier(world_comm(), req)
        })
    }

    /// `root`'s `buf` on every rank.
    fn broadcast_of<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let n = count(buf.len())?;
        let mut st = self.lock();
        // SAFETY: the buffer is borrowed for the whole collective.
        self.collective(&mut st, "broadcast", |req| unsafe {
            ffi::MPI_Ibcast(
                buf.as_mut_ptr() as *mut c_void,
                n,
                T::datatype(),
                root as c_int,
                world_comm(),
                req,
            )
        })
    }
}

/// Posts the standing receive for pings.
fn post_ping_receive(st: &mut State) -> Result<()> {
    // SAFETY: `ping_in` is boxed in the state, which outlives the request (it is cancelled
    // when the communicator drops).
    unsafe {
        check(
            "receive",
            ffi::MPI_Irecv(
                &mut *st.ping_in as *mut u64 as *mut c_void,
                1,
                ffi::RSMPI_UINT64_T,
                ffi::RSMPI_ANY_SOURCE,
                PING_TAG,
                world_comm(),
                &mut st.ping,
            ),
        )
    }
}

/// Answers a ping that has come, if any.
fn answer_pings(st: &mut State) -> Result<()> {
    let mut flag: c_int = 0;
    // SAFETY: a zeroed status is a valid out-parameter; `st.ping` is live.
    let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
    unsafe { check("test", ffi::MPI_Test(&mut st.ping, &mut flag, &mut status))? };
    if flag == 0 {
        return Ok(());
    }
    let mut req = null_request();
    // SAFETY: the answer's buffer is boxed in the state; the request is freed at once, which
    // lets the small send complete on its own.
    unsafe {
        check(
            "answer",
            ffi::MPI_Isend(
                &*st.ping_in as *const u64 as *const c_void,
                1,
                ffi::RSMPI_UINT64_T,
                status.MPI_SOURCE,
                PONG_TAG,
                world_comm(),
                &mut req,
            ),
        )?;
        check("free", ffi::MPI_Request_free(&mut req))?;
    }
    post_ping_receive(st)
}

/// Polls `reqs` until all complete (true) or `limit` passes (false), answering pings meanwhile.
fn wait(st: &mut State, reqs: &mut [ffi::MPI_Request], limit: Duration) -> Result<bool> {
    let t0 = Instant::now();
    let mut polls = 0u32;
    loop {
        let mut done = true;
        for r in reqs.iter_mut() {
            if *r == null_request() {
                continue;
            }
            let mut flag: c_int = 0;
            // SAFETY: `r` is a live request; MPI_Test sets it to MPI_REQUEST_NULL when done.
            unsafe {
                check(
                    "test",
                    ffi::MPI_Test(r, &mut flag, ffi::RSMPI_STATUS_IGNORE),
                )?;
            }
            done &= flag != 0;
        }
        if done {
            return Ok(true);
        }
        answer_pings(st)?;
        if t0.elapsed() > limit {
            return Ok(false);
        }
        polls += 1;
        if polls > SPIN_POLLS {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // The window is freed before MPI_Finalize (when `_universe` drops).
        st.shm = None;
        // SAFETY: cancels and completes the standing ping receive before MPI_Finalize.
        unsafe {
            ffi::MPI_Cancel(&mut st.ping);
            ffi::MPI_Wait(&mut st.ping, ffi::RSMPI_STATUS_IGNORE);
        }
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if let Some(res) = self.shm_all_reduce(None, buf) {
            return res;
        }
        // MPI's send and receive buffers must differ: a copy, into a buffer kept between calls
        // (a fresh 45 MB one costs as much again in page faults).
        let mut send = std::mem::take(&mut self.lock().send);
        send.clear();
        send.extend_from_slice(buf);
        let res = self.all_reduce_into(&send, buf);
        self.lock().send = send;
        res
    }

    fn all_reduce_sum_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if let Some(res) = self.shm_all_reduce(Some(send), recv) {
            return res;
        }
        self.all_reduce_into(send, recv)
    }

    fn all_reduce_mean_parts(&self, parts: &mut [&mut [f32]]) -> Option<Result<()>> {
        let scale = 1.0 / self.world as f32;
        self.with_shm(|shm, barrier| shm.all_reduce_parts(parts, scale, barrier))
    }

    fn shared_grads(&self, len: usize) -> Option<Result<super::shared::SharedGrads>> {
        // Only where the window all-reduce runs (every rank on this machine, not turned off),
        // for models whose gradients fit one pass of it, with the one-barrier sum.
        let eligible = self.lock().shm.is_some()
            && self.world <= super::shm::ONE_PHASE_MAX_WORLD
            && (1..=super::shm::CHUNK).contains(&len);
        if !eligible {
            return None;
        }
        super::shared::create(self, len).transpose()
    }

    fn all_reduce_mean_shared(&self, grads: &mut super::shared::SharedGrads) -> Result<()> {
        let mut st = self.lock();
        grads.reduce_mean(&mut || self.timed_barrier(&mut st, "all-reduce"))
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        // MPI's send and receive buffers must differ (metrics: a few values).
        let send = buf.to_vec();
        self.all_reduce_into(&send, buf)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast_of(buf, root)
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.broadcast_of(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        let mut st = self.lock();
        self.timed_barrier(&mut st, "barrier")
    }

    fn abort(&self, code: i32) -> ! {
        // SAFETY: MPI_Abort may be called at any time after MPI_Init.
        unsafe {
            ffi::MPI_Abort(world_comm(), code);
        }
        std::process::exit(code)
    }
}
