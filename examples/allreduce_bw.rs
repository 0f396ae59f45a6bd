//! All-reduce bandwidth of wick's MPI communicator against a plain memcpy of the same size.
//!
//! `mpirun -np 2 target/release/examples/allreduce_bw [MB]` (build with `--features mpi`).
//! Prints, on rank 0, the time per all-reduce (sum) of MB megabytes of f32 and the algorithm
//! bandwidth (bytes of the buffer / time), as PyTorch's and NCCL's tests report it.
//!
//! `allreduce_bw --check` instead checks the results, on every rank and bit for bit: the
//! in-place sum, the sum into another buffer and the DDP reducer's mean, of buffers of one and
//! of several passes through the shared-memory window, in parts of odd lengths (with
//! `WICK_MPI_SHM=0`: through MPI), over repeated rounds (each rank's
//! values change every round). The reducer keeps its gradients from round to round, as in
//! training, so with up to 4 ranks the small ones live in shared gradient memory
//! (`wick::dist::shared`) and alternate between its two buffers. `tests/ddp.rs` runs it
//! with 2, 3 and 5 ranks. Exits non-zero on a mismatch.

#[cfg(feature = "mpi")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::time::Instant;
    use wick::dist::Communicator;

    if std::env::args().nth(1).as_deref() == Some("--check") {
        let comm = wick::dist::mpi::Mpi::init(60.0)?;
        return check(&comm);
    }
    let mb: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(45.0);
    let n = (mb * 1e6 / 4.0) as usize;
    let comm = wick::dist::mpi::Mpi::init(300.0)?;
    let mut buf: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let mut reducer = wick::dist::GradReducer::new(25.0);
    let mut grads = wick::model::Grads::from_vecs(vec!["g".into()], vec![buf.clone()]);
    // About a second of work at 2 GB/s, at least 10 rounds.
    let iters = ((2e9 / (n.max(1) * 4) as f64) as usize).clamp(10, 20_000);
    // Warm-up, then time.
    comm.all_reduce_sum(&mut buf)?;
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        comm.all_reduce_sum(&mut buf)?;
    }
    let one = t.elapsed().as_secs_f64() / iters as f64;
    // Its first call may set up shared gradient memory.
    reducer.all_reduce_mean(&comm, &mut grads)?;
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        reducer.all_reduce_mean(&comm, &mut grads)?;
    }
    let bucketed = t.elapsed().as_secs_f64() / iters as f64;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    let copy = t.elapsed().as_secs_f64() / iters as f64;
    // The latency floor: an all-reduce of two f64 (the trainer's per-step stop vote).
    let mut votes = [0f64; 2];
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..1000 {
        comm.all_reduce_sum_f64(&mut votes)?;
    }
    let tiny = t.elapsed().as_secs_f64() / 1000.0;
    if comm.rank() == 0 {
        let bytes = (n * 4) as f64;
        println!(
            "{} ranks, {:.1} MB of f32:\n  all-reduce, one buffer   {:8.3} ms  {:6.2} GB/s\n  all-reduce, DDP reducer   {:7.3} ms  {:6.2} GB/s\n  memcpy                   {:8.3} ms  {:6.2} GB/s\n  all-reduce of 2 f64      {:8.4} ms",
            comm.world(),
            bytes / 1e6,
            one * 1e3,
            bytes / one / 1e9,
            bucketed * 1e3,
            bytes / bucketed / 1e9,
            copy * 1e3,
            bytes / copy / 1e9,
            tiny * 1e3
        );
    }
    Ok(())
}

/// The value rank `r` contributes at index `i` to the all-reduce keyed `key` (every call has
/// its own key, so two calls that share a buffer of the window never hold the same values).
/// Whole: small integers, whose sums are exact in f32 in any order, so they can be checked
/// against a formula. Otherwise fractions, whose sums depend on the order of addition: those
/// are checked to be the same bits on every rank.
#[cfg(feature = "mpi")]
fn value(r: usize, i: usize, key: usize, whole: bool) -> f32 {
    let v = ((i * 7 + r * 31 + key * 131) % 1021) as f32;
    if whole {
        v
    } else {
        v * 0.1 + 0.013 * r as f32
    }
}

#[cfg(feature = "mpi")]
fn check(comm: &wick::dist::mpi::Mpi) -> Result<(), Box<dyn std::error::Error>> {
    use wick::dist::Communicator;
    let (rank, world) = (comm.rank(), comm.world());
    let inv = 1.0 / world as f32;
    let mut bad = 0usize;
    let mut key = 0usize;
    // `got` against the exact result (whole values), or against rank 0's bits (fractions).
    let mut expect = |what: &str, got: &[f32], want: &dyn Fn(usize) -> f32, whole: bool| {
        let reference: Vec<f32> = if whole {
            (0..got.len()).map(want).collect()
        } else {
            let mut r = got.to_vec();
            comm.broadcast(&mut r, 0)?;
            r
        };
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != reference[i].to_bits()) {
            let whose = if whole { "expected" } else { "rank 0 has" };
            eprintln!(
                "rank {rank}: {what}: index {i} is {}, {whose} {}",
                got[i], reference[i]
            );
            bad += 1;
        }
        Ok::<(), wick::Error>(())
    };
    // Parts of the DDP reducer (one model's gradients): odd lengths, empty ones.
    let small: &[usize] = &[1, 7, 0, 1000, 4099, 3];
    // Over one pass of the shared-memory window (1 MB) in all: several passes, one cut inside
    // a part (with WICK_MPI_SHM=0 the reducer packs buckets of 2,500 values for MPI).
    let large: &[usize] = &[300_001, 5];
    let empty: &[usize] = &[0, 0];
    let mut reducers: Vec<(wick::dist::GradReducer, wick::model::Grads)> = [small, large, empty]
        .iter()
        .map(|lens| {
            let names = lens.iter().map(|n| format!("p{n}")).collect();
            let bufs = lens.iter().map(|&n| vec![0.0; n]).collect();
            (
                wick::dist::GradReducer::new(0.01),
                wick::model::Grads::from_vecs(names, bufs),
            )
        })
        .collect();
    for round in 0..6 {
        let whole = round != 5;
        for &n in &[0usize, 1, 4096 + 5, 300_001] {
            key += 1;
            let sum = |i: usize| (0..world).map(|r| value(r, i, key, true)).sum::<f32>();
            let mut buf: Vec<f32> = (0..n).map(|i| value(rank, i, key, whole)).collect();
            comm.all_reduce_sum(&mut buf)?;
            expect(&format!("in-place sum of {n}"), &buf, &sum, whole)?;
            key += 1;
            let sum = |i: usize| (0..world).map(|r| value(r, i, key, true)).sum::<f32>();
            let send: Vec<f32> = (0..n).map(|i| value(rank, i, key, whole)).collect();
            let mut recv = vec![f32::NAN; n];
            comm.all_reduce_sum_into(&send, &mut recv)?;
            expect(
                &format!("sum of {n} into another buffer"),
                &recv,
                &sum,
                whole,
            )?;
        }
        // The same reducer and gradients every round, as in training: the first all-reduce
        // may move the gradients into shared memory, whose two buffers then alternate.
        for (lens, (reducer, grads)) in [small, large, empty].iter().zip(reducers.iter_mut()) {
            key += 1;
            let mut at = 0;
            for (b, &n) in grads.bufs_mut().into_iter().zip(lens.iter()) {
                for (i, v) in b.iter_mut().enumerate() {
                    *v = value(rank, at + i, key, whole);
                }
                at += n;
            }
            reducer.all_reduce_mean(comm, grads)?;
            let mut at = 0;
            for (b, &n) in grads.bufs().zip(lens.iter()) {
                let base = at;
                let mean = |i: usize| {
                    (0..world)
                        .map(|r| value(r, base + i, key, true))
                        .sum::<f32>()
                        * inv
                };
                expect(&format!("reducer mean of a part of {n}"), b, &mean, whole)?;
                at += n;
            }
        }
    }
    let mut failed = [bad as f64];
    comm.all_reduce_sum_f64(&mut failed)?;
    if failed[0] > 0.0 {
        return Err(format!("{} mismatches over {world} ranks", failed[0]).into());
    }
    if rank == 0 {
        println!("all-reduce check: {world} ranks ok");
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn main() {
    eprintln!("build with --features mpi and run under mpirun");
    std::process::exit(2);
}
