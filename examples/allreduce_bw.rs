//! All-reduce bandwidth of wick's MPI communicator against a plain memcpy of the same size.
//!
//! `mpirun -np 2 target/release/examples/allreduce_bw [MB]` (build with `--features mpi`).
//! Prints, on rank 0, the time per all-reduce (sum) of MB megabytes of f32 and the algorithm
//! bandwidth (bytes of the buffer / time), as PyTorch's and NCCL's tests report it.

#[cfg(feature = "mpi")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::time::Instant;
    use wick::dist::Communicator;

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
            "{} ranks, {:.1} MB of f32:\n  all-reduce, one buffer   {:8.2} ms  {:6.2} GB/s\n  all-reduce, 25 MB buckets {:7.2} ms  {:6.2} GB/s\n  memcpy                   {:8.2} ms  {:6.2} GB/s\n  all-reduce of 2 f64      {:8.4} ms",
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

#[cfg(not(feature = "mpi"))]
fn main() {
    eprintln!("build with --features mpi and run under mpirun");
    std::process::exit(2);
}
