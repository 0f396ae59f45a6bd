//! Data-parallel training over MPI (2 CPU ranks through `wick launch`): equivalence with one
//! big batch, and what happens when a rank dies or hangs.
//!
//! Needs the `mpi` feature and OpenMPI (`mpirun`); scripts/test.sh passes `--features mpi`
//! and .ci/run installs OpenMPI.

mod common;

#[cfg(feature = "mpi")]
use std::path::Path;
#[cfg(feature = "mpi")]
use std::process::{Child, Command, Stdio};
#[cfg(feature = "mpi")]
use std::time::{Duration, Instant};

/// Without the `mpi` feature the tests below do not exist: that must not happen in CI.
#[cfg(not(feature = "mpi"))]
#[test]
fn ci_builds_the_mpi_tests() {
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "CI must run the tests with --features mpi (scripts/test.sh does)"
    );
}

#[cfg(feature = "mpi")]
fn launch(nproc: usize) -> Command {
    let mut c = common::wick();
    c.args(["launch", "--nproc", &nproc.to_string(), "--"]);
    c
}

/// Every tensor of two safetensors files: the largest absolute difference.
#[cfg(feature = "mpi")]
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (sa, sb) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bb).unwrap(),
    );
    let mut names = sa.names();
    names.sort();
    let mut namesb = sb.names();
    namesb.sort();
    assert_eq!(names, namesb);
    let f32s = |v: &[u8]| -> Vec<f32> {
        v.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut worst = 0f32;
    for n in names {
        let (x, y) = (
            f32s(sa.tensor(n).unwrap().data()),
            f32s(sb.tensor(n).unwrap().data()),
        );
        assert_eq!(x.len(), y.len(), "{n}");
        for (p, q) in x.iter().zip(&y) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// Trains `config` with `sets` on one rank × `2b` and two ranks × `b` (with `env` set);
/// returns the largest weight difference, and each run's steps.
#[cfg(feature = "mpi")]
fn one_vs_two(config: &str, b: usize, sets: &[&str], env: &[(&str, &str)]) -> (f32, u64, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["--threads".into(), "1".into(), "--quiet".into()];
    for s in sets {
        args.extend(["--set".into(), s.to_string()]);
    }
    let one = tmp.path().join("one");
    let o = common::wick()
        .args(["train", config, "--run-dir"])
        .arg(&one)
        .args(&args)
        .args(["--set", &format!("train.batch_size={}", 2 * b)])
        .output()
        .unwrap();
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "1 rank failed:\n{out}\n{err}");
    let two = tmp.path().join("two");
    let o = launch(2)
        .envs(env.iter().copied())
        .args(["train", config, "--run-dir"])
        .arg(&two)
        .args(&args)
        .args(["--set", &format!("train.batch_size={b}")])
        .output()
        .unwrap();
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "2 ranks failed:\n{out}\n{err}");
    // Only rank 0 writes: one line, the run directory.
    assert_eq!(out.trim(), two.display().to_string(), "{err}");
    let steps = |r: &Path| common::summary(r)["steps"].as_u64().unwrap();
    let d = max_abs_diff(&common::weights(&one), &common::weights(&two));
    (d, steps(&one), steps(&two))
}

#[cfg(feature = "mpi")]
#[test]
fn two_ranks_of_32_match_one_rank_of_64_on_the_digits_mlp() {
    std::env::set_current_dir(common::root()).unwrap();
    // 1,437 training rows: 22 full batches of 64 per epoch (drop_last keeps every step a
    // full 64 = 2 × 32), 3 epochs = 66 optimizer steps.
    let sets = ["train.epochs=3", "train.drop_last=true"];
    let (d, s1, s2) = one_vs_two("configs/digits_mlp.toml", 32, &sets, &[]);
    assert_eq!((s1, s2), (66, 66));
    eprintln!("digits MLP: max |w1 - w2| = {d:e} after {s1} steps");
    assert!(d <= 1e-5, "max abs weight difference {d}");
    // The same through MPI's own all-reduce instead of the shared-memory window: each sum
    // is one addition of two values either way, so the weights are the same.
    let (d_mpi, _, _) = one_vs_two(
        "configs/digits_mlp.toml",
        32,
        &sets,
        &[("WICK_MPI_SHM", "0")],
    );
    assert_eq!(
        d_mpi, d,
        "shared memory and MPI messages give different weights"
    );
}

#[cfg(feature = "mpi")]
#[test]
fn two_ranks_match_one_on_a_resnet_with_a_frozen_backbone() {
    std::env::set_current_dir(common::root()).unwrap();
    if !common::require_asset(
        Path::new("data/mnist/train_100.csv").is_file(),
        "MNIST digits (scripts/fetch-mnist.sh)",
    ) {
        return;
    }
    // A narrow ResNet-18 whose BatchNorm layers are frozen (evaluation mode): training mode
    // would normalise by each rank's own batch statistics, as PyTorch's DDP does without
    // SyncBatchNorm, which is not the statistics of the global batch.
    // configs/mnist_transfer.toml with a randomly initialised backbone.
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("resnet.toml");
    let text = std::fs::read_to_string("configs/mnist_transfer.toml").unwrap();
    let text: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("pretrained"))
        .collect();
    std::fs::write(&config, text.join("\n")).unwrap();
    // Without the feature cache, every step runs the whole network forward on each rank's
    // half of the batch; with it, each rank computes the features of its share of the samples
    // and both train the head on all of them.
    for cache in [false, true] {
        let flag = format!("train.cache_features={cache}");
        let (d, s1, s2) = one_vs_two(
            config.to_str().unwrap(),
            32,
            &[
                "model.width=8",
                "model.stages=2",
                &flag,
                "train.drop_last=true",
                "train.epochs=4",
                "train.eval_every=4",
                "optim.lr=3e-3",
            ],
            &[],
        );
        assert_eq!((s1, s2), (60, 60));
        eprintln!("ResNet, {flag}: max |w1 - w2| = {d:e} after {s1} steps");
        assert!(d <= 1e-5, "max abs weight difference {d}");
    }
}

/// The PID of rank `rank` of a job whose command line mentions `marker`.
#[cfg(feature = "mpi")]
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        if has(&cmd, marker.as_bytes())
            && has(&cmd, b"train")
            && !has(&cmd, b"launch")
            && !has(&cmd, b"mpirun")
            && env
                .split(|&b| b == 0)
                .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// Starts a long 2-rank digits run in `dir`, waits until its first epoch is checkpointed, and
/// returns the launcher and rank 1's PID.
#[cfg(feature = "mpi")]
#[allow(clippy::zombie_processes)] // the caller waits for it
fn start_long_job(dir: &Path) -> (Child, u32) {
    let child = launch(2)
        .args(["train", "configs/digits_mlp.toml", "--quiet", "--run-dir"])
        .arg(dir)
        .args([
            "--threads",
            "1",
            "--set",
            "train.epochs=100000",
            "--set",
            "dist.timeout_s=5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = dir.display().to_string();
    let t0 = Instant::now();
    loop {
        let ready = dir.join("checkpoints/last").is_dir();
        if let (true, Some(pid)) = (ready, rank_pid(&marker, 1)) {
            return (child, pid);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the launcher; returns its success, its stderr, and how long it took.
#[cfg(feature = "mpi")]
fn finish(child: Child, t0: Instant) -> (bool, String, Duration) {
    let o = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    let (_, err) = common::text(&o);
    (o.status.success(), err, took)
}

/// The run's `last` checkpoint is whole: `wick eval` reads it.
#[cfg(feature = "mpi")]
fn assert_last_checkpoint_evaluates(dir: &Path) {
    let o = common::wick()
        .arg("eval")
        .arg(dir)
        .args(["--checkpoint", "last", "--json"])
        .output()
        .unwrap();
    let (out, e) = common::text(&o);
    assert!(o.status.success(), "{out}\n{e}");
}

#[cfg(feature = "mpi")]
#[test]
fn a_killed_rank_stops_the_job_and_names_the_rank() {
    std::env::set_current_dir(common::root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("killed");
    let (child, pid) = start_long_job(&dir);
    let t0 = Instant::now();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let (ok, err, took) = finish(child, t0);
    eprintln!("stopped after {took:?}:\n{err}");
    assert!(!ok, "the job must fail:\n{err}");
    assert!(took < Duration::from_secs(5 + 20), "took {took:?}");
    assert!(err.contains("rank 1"), "the error names rank 1:\n{err}");
    // The last checkpoint is whole: the run evaluates from it.
    assert_last_checkpoint_evaluates(&dir);
}

#[cfg(feature = "mpi")]
#[test]
fn a_hung_rank_times_out_with_an_error_naming_it() {
    std::env::set_current_dir(common::root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hung");
    let (child, pid) = start_long_job(&dir);
    let t0 = Instant::now();
    // Stopped, not dead: only the survivors' timeout can notice.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let (ok, err, took) = finish(child, t0);
    eprintln!("stopped after {took:?}:\n{err}");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(!ok, "the job must fail:\n{err}");
    assert!(took < Duration::from_secs(5 + 20), "took {took:?}");
    assert!(
        err.contains("error: rank 0: ")
            && (err.contains("rank 1 stopped responding in all-reduce")
                || err.contains("rank 1 did not reach all-reduce"))
            && err.contains("it died or hangs")
            && err.contains("dist.timeout_s = 5"),
        "rank 0's error names rank 1 and the timeout:\n{err}"
    );
    assert_last_checkpoint_evaluates(&dir);
}

/// A 2-rank run killed mid-epoch (every rank aborts after step 30) and resumed with
/// `--resume` ends with the same bytes as an uninterrupted 2-rank run.
#[cfg(feature = "mpi")]
#[test]
fn a_data_parallel_run_resumes_exactly() {
    std::env::set_current_dir(common::root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "--threads",
        "1",
        "--quiet",
        "--set",
        "train.epochs=3",
        "--set",
        "train.batch_size=16",
    ];
    let full = tmp.path().join("full");
    let o = launch(2)
        .args(["train", "configs/digits_mlp.toml", "--run-dir"])
        .arg(&full)
        .args(sets)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o).1);
    let cut = tmp.path().join("cut");
    let o = launch(2)
        .args(["train", "configs/digits_mlp.toml", "--run-dir"])
        .arg(&cut)
        .args(sets)
        .args(["--abort-after-steps", "70"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "the run should have been cut short");
    let o = launch(2)
        .args(["train", "--quiet", "--threads", "1", "--resume"])
        .arg(&cut)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o).1);
    assert_eq!(
        common::sha256(&common::weights(&full)),
        common::sha256(&common::weights(&cut)),
        "resumed weights differ from the uninterrupted run's"
    );
}

/// `mpirun`, allowed to run as root when the tests do.
#[cfg(feature = "mpi")]
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    if unsafe { libc::geteuid() } == 0 {
        c.arg("--allow-run-as-root");
    }
    c
}

/// `mpirun -np 2 wick train CONFIG`, without `wick launch`: the world comes from OpenMPI's
/// environment, and rank 0 alone prints the run directory.
#[cfg(feature = "mpi")]
#[test]
fn plain_mpirun_runs_a_data_parallel_job() {
    std::env::set_current_dir(common::root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plain");
    let o = mpirun()
        .current_dir(common::root())
        .env_remove("RAYON_NUM_THREADS")
        .args(["-np", "2", "--bind-to", "none", env!("CARGO_BIN_EXE_wick")])
        .args([
            "train",
            "configs/digits_mlp.toml",
            "--threads",
            "1",
            "--run-dir",
        ])
        .arg(&dir)
        .args(["--set", "train.epochs=2"])
        .output()
        .unwrap();
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out.trim(), dir.display().to_string(), "{err}");
    assert!(
        err.contains("data-parallel: 2 ranks (mpi), batch 64 per rank = 128 per step"),
        "{err}"
    );
    assert!(common::final_metric(&dir, "eval_accuracy") > 0.9);
}

/// `WICK_MPI_SHM=0` on one rank only (set per program of an MPMD `mpirun`): the ranks agree
/// to leave shared memory, rather than one waiting in MPI's all-reduce while the other waits
/// at the shared-memory barrier until the timeout.
#[cfg(feature = "mpi")]
#[test]
fn ranks_agree_when_only_one_turns_shared_memory_off() {
    std::env::set_current_dir(common::root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mixed");
    let exe = env!("CARGO_BIN_EXE_wick");
    let args = |c: &mut Command| {
        c.args([
            "train",
            "configs/digits_mlp.toml",
            "--quiet",
            "--threads",
            "1",
        ])
        .arg("--run-dir")
        .arg(&dir)
        .args(["--set", "train.epochs=2", "--set", "dist.timeout_s=10"]);
    };
    let mut c = mpirun();
    c.current_dir(common::root())
        .env_remove("RAYON_NUM_THREADS")
        .args([
            "--bind-to",
            "none",
            "-np",
            "1",
            "env",
            "WICK_MPI_SHM=0",
            exe,
        ]);
    args(&mut c);
    c.args([":", "-np", "1", exe]);
    args(&mut c);
    let o = c.output().unwrap();
    let (out, err) = common::text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(common::final_metric(&dir, "eval_accuracy") > 0.9);
}

/// The communicator's results, bit for bit on every rank, with 2, 3 and 5 ranks: in-place
/// sums, sums into another buffer and the DDP reducer's mean over parts of odd lengths, in one
/// pass through the shared-memory window and in several (2 and 3 ranks: every rank adds all
/// slots; 5: the sum is split between the ranks), and through MPI's all-reduce without it.
#[cfg(feature = "mpi")]
#[test]
fn all_reduces_give_exact_sums_on_every_rank() {
    let exe = Path::new(env!("CARGO_BIN_EXE_wick"))
        .parent()
        .unwrap()
        .join("examples/allreduce_bw");
    // `cargo test` builds the examples (scripts/test.sh runs it that way).
    if !common::require_asset(
        exe.is_file(),
        "target/release/examples/allreduce_bw (cargo build --release --features mpi --example allreduce_bw)",
    ) {
        return;
    }
    for (np, shm) in [(2, "1"), (3, "1"), (5, "1"), (2, "0")] {
        let o = mpirun()
            .env("WICK_MPI_SHM", shm)
            .args([
                "--oversubscribe",
                "-np",
                &np.to_string(),
                "--bind-to",
                "none",
            ])
            .arg(&exe)
            .arg("--check")
            .output()
            .unwrap();
        let (out, err) = common::text(&o);
        assert!(
            o.status.success() && out.contains(&format!("all-reduce check: {np} ranks ok")),
            "{np} ranks, WICK_MPI_SHM={shm}:\n{out}\n{err}"
        );
    }
}
