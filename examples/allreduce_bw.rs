//! All-reduce bandwidth of wick's MPI communicator against a plain memcpy of the same size.
//!
//! `mpirun -np 2 target/release/examples/allreduce_bw [MB]` (build with `--features mpi`).
//! Prints, on rank 0, the time per all-reduce (sum) of MB megabytes of f32 and the algorithm
//! bandwidth (bytes of the buffer / time), as PyTorch's and NCCL's tests report it.
//!
//! `allreduce_bw --check` instead checks the results, on every rank and bit for bit: the
//! in-place sum, the sum into another buffer and the DDP reducer's mean, of buffers below and
//! above the shared-memory limit, in parts of odd lengths, over repeated rounds (each rank's
//! values change every round). `tests/ddp.rs` runs it with 2, 3 and 5 ranks. Exits non-zero
//! on a mismatch.

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
    let mut grads = wick::model::Grads {
        names: vec!["g".into()],
        bufs: vec![buf.clone()],
    };
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
            "{} ranks, {:.1} MB of f32:\n  all-reduce, one buffer   {:8.3} ms  {:6.2} GB/s\n  all-reduce, 25 MB buckets {:7.3} ms  {:6.2} GB/s\n  memcpy                   {:8.3} ms  {:6.2} GB/s\n  all-reduce of 2 f64      {:8.4} ms",
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

/// The value rank `r` contributes at index `i` in `round`: small integers, so every sum is
/// exact in f32 whatever the order of addition.
#[cfg(feature = "mpi")]
fn value(r: usize, i: usize, round: usize) -> f32 {
    ((i * 7 + r * 31 + round * 13) % 1000) as f32
}

#[cfg(feature = "mpi")]
fn check(comm: &wick::dist::mpi::Mpi) -> Result<(), Box<dyn std::error::Error>> {
    use wick::dist::Communicator;
    let (rank, world) = (comm.rank(), comm.world());
    let sum = |i: usize, round: usize| (0..world).map(|r| value(r, i, round)).sum::<f32>();
    let mine = |n: usize, round: usize| (0..n).map(|i| value(rank, i, round)).collect::<Vec<_>>();
    let inv = 1.0 / world as f32;
    let mut bad = 0usize;
    let mut expect = |what: &str, got: &[f32], want: &dyn Fn(usize) -> f32| {
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want(i).to_bits()) {
            eprintln!(
                "rank {rank}: {what}: index {i} is {}, expected {}",
                got[i],
                want(i)
            );
            bad += 1;
        }
    };
    // Parts of the DDP reducer (one model's gradients): odd lengths, an empty one.
    let small: &[usize] = &[1, 7, 0, 1000, 4099, 3];
    // Above the shared-memory limit (1 MB): MPI's own all-reduce.
    let large: &[usize] = &[300_001, 5];
    for round in 0..6 {
        for &n in &[1usize, 4096 + 5, 300_001] {
            let mut buf = mine(n, round);
            comm.all_reduce_sum(&mut buf)?;
            expect(&format!("in-place sum of {n}"), &buf, &|i| sum(i, round));
            let send = mine(n, round + 1);
            let mut recv = vec![f32::NAN; n];
            comm.all_reduce_sum_into(&send, &mut recv)?;
            expect(&format!("sum of {n} into another buffer"), &recv, &|i| {
                sum(i, round + 1)
            });
        }
        for lens in [small, large] {
            let mut reducer = wick::dist::GradReducer::new(0.01);
            let mut grads = wick::model::Grads {
                names: lens.iter().map(|n| format!("p{n}")).collect(),
                bufs: Vec::new(),
            };
            let mut at = 0;
            for &n in lens {
                grads
                    .bufs
                    .push((at..at + n).map(|i| value(rank, i, round)).collect());
                at += n;
            }
            reducer.all_reduce_mean(comm, &mut grads)?;
            let mut at = 0;
            for (b, &n) in grads.bufs.iter().zip(lens) {
                let base = at;
                expect(&format!("reducer mean of a part of {n}"), b, &|i| {
                    sum(base + i, round) * inv
                });
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
