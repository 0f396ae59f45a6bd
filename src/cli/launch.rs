//! `wick launch`: starts a data-parallel job under `mpirun`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Number of ranks (processes) to start.
    #[arg(long, short = 'n', default_value_t = 2)]
    pub nproc: usize,
    /// An MPI hostfile naming the machines (`HOST slots=N` per line); default: this machine.
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// The mpirun program.
    #[arg(long, default_value = "mpirun", value_name = "PATH")]
    pub mpirun: String,
    /// An extra argument for mpirun (repeatable), e.g. --mpi-arg=--bind-to --mpi-arg=core.
    #[arg(long = "mpi-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub mpi_args: Vec<String>,
    /// Print the mpirun command instead of running it.
    #[arg(long)]
    pub dry_run: bool,
    /// The wick command every rank runs, after `--`: e.g. `-- train configs/digits_mlp.toml`.
    #[arg(last = true, required = true, value_name = "WICK_ARGS")]
    pub command: Vec<String>,
}

/// The mpirun command line for `a`, running `exe` on every rank.
pub fn mpirun_command(a: &LaunchArgs, exe: &str, as_root: bool, cores: usize) -> Vec<String> {
    let mut cmd = vec![a.mpirun.clone(), "-np".into(), a.nproc.to_string()];
    if let Some(h) = &a.hostfile {
        cmd.extend(["--hostfile".into(), h.display().to_string()]);
    } else if a.nproc > cores {
        // One machine with fewer cores than ranks: OpenMPI refuses unless told.
        cmd.push("--oversubscribe".into());
    }
    if as_root {
        cmd.push("--allow-run-as-root".into());
    }
    // Each rank runs its own compute threads (run.threads, by default the machine's cores
    // shared between its ranks): binding a rank to one core would squeeze them.
    if !a.mpi_args.iter().any(|s| s == "--bind-to") {
        cmd.extend(["--bind-to".into(), "none".into()]);
    }
    cmd.extend(a.mpi_args.iter().cloned());
    cmd.push(exe.into());
    cmd.extend(a.command.iter().cloned());
    cmd
}

pub fn run(a: LaunchArgs) -> anyhow::Result<()> {
    if a.nproc == 0 {
        bail!("--nproc 0: start at least one rank");
    }
    if !cfg!(feature = "mpi") {
        bail!("this wick was built without MPI; rebuild it with `cargo install --path . --features mpi` (after `apt install libopenmpi-dev openmpi-bin libclang-dev`)");
    }
    if a.command.first().map(String::as_str) == Some("launch") {
        bail!("`wick launch -- launch …` would start launchers on every rank; give the command each rank runs, e.g. `-- train CONFIG`");
    }
    let exe = std::env::current_exe().context("locating the wick executable")?;
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cmd = mpirun_command(&a, &exe.display().to_string(), as_root, cores);
    if a.dry_run {
        println!("{}", cmd.join(" "));
        return Ok(());
    }
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "{}: not found; install OpenMPI (`apt install openmpi-bin`) or pass --mpirun PATH",
                a.mpirun
            ),
            _ => anyhow::anyhow!("{}: {e}", a.mpirun),
        })?;
    if !status.success() {
        bail!(
            "the job failed ({}); the ranks' errors are above",
            match status.code() {
                Some(c) => format!("mpirun exited with status {c}"),
                None => "mpirun was killed by a signal".into(),
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: LaunchArgs,
    }

    #[test]
    fn builds_the_mpirun_line() {
        let cli = Cli::parse_from(["x", "--nproc", "4", "--", "train", "c.toml", "--quiet"]);
        assert_eq!(
            mpirun_command(&cli.a, "/bin/wick", true, 2).join(" "),
            "mpirun -np 4 --oversubscribe --allow-run-as-root --bind-to none /bin/wick train c.toml --quiet"
        );
        let cli = Cli::parse_from([
            "x",
            "--hostfile",
            "hosts",
            "--mpi-arg=--bind-to",
            "--mpi-arg=core",
            "--",
            "train",
            "c.toml",
        ]);
        assert_eq!(
            mpirun_command(&cli.a, "wick", false, 2).join(" "),
            "mpirun -np 2 --hostfile hosts --bind-to core wick train c.toml"
        );
    }
}
