//! `wick train`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use crate::config;
use crate::dist::{self, Communicator};
use crate::train::callback::AbortAfter;
use crate::train::progress::{MetricsLogger, Progress, Verbosity};
use crate::train::{RunDir, Trainer};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run config (TOML). Not needed with --resume.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. --set optim.lr=0.01 --set model.hidden=[128,64].
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in RUN_DIR from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Write the run here instead of <run.output_dir>/<run.name>-<timestamp>.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Compute threads (overrides run.threads; 0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print nothing but the run directory.
    #[arg(long, short)]
    pub quiet: bool,
    /// Stop abruptly after N optimizer steps without saving, as a crash would (for testing
    /// resume).
    #[arg(long, hide = true)]
    pub abort_after_steps: Option<u64>,
}

/// Applies the thread count before any parallel work starts.
fn set_threads(n: usize) {
    if n > 0 {
        // candle reads RAYON_NUM_THREADS for its matmuls; rayon's global pool is built here.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let (cfg, run, resume) = match &a.resume {
        Some(dir) => {
            if !a.set.is_empty() {
                bail!("--set cannot be used with --resume: a resumed run keeps the config it started with ({})", dir.join("config.toml").display());
            }
            let run = RunDir::open(dir)?;
            (run.config()?, Some(run), true)
        }
        None => {
            let path = a
                .config
                .as_ref()
                .expect("clap requires CONFIG without --resume");
            (config::load(path, &a.set)?, None, false)
        }
    };
    let comm = dist::init(&cfg.dist)?;
    let threads = a.threads.unwrap_or(cfg.run.threads);
    set_threads(match (threads, dist::launched_world()) {
        // Ranks that share a machine share its cores.
        (0, Some((_, w, local))) if w > 1 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / local).max(1)
        }
        (n, _) => n,
    });
    if comm.world() == 1 {
        return train(a, cfg, run, resume, comm);
    }
    let rank = comm.rank();
    let abort = comm.clone();
    match train(a, cfg, run, resume, comm) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The other ranks would wait for this one until their timeout: end the job now.
            eprintln!("error: rank {rank}: {}", super::describe(&e));
            abort.abort(2)
        }
    }
}

fn train(
    a: TrainArgs,
    cfg: config::Config,
    run: Option<RunDir>,
    resume: bool,
    comm: Arc<dyn Communicator>,
) -> anyhow::Result<()> {
    let main = comm.is_main();
    let mut trainer = Trainer::from_config(&cfg)?;
    trainer.set_communicator(comm.clone());
    // Before a run directory exists: a config that cannot train leaves none behind.
    trainer.check()?;
    let run = match run {
        Some(r) => {
            let saved = r.schema()?;
            if saved != trainer.schema {
                bail!(
                    "{}: the data differs from what this run was trained on (dataset.json no longer matches {}); restore the data or start a new run",
                    r.path.display(),
                    cfg.data.path.display()
                );
            }
            r
        }
        None if main => RunDir::create(&cfg, &trainer.schema, a.run_dir.as_deref())?,
        None => RunDir::at(Path::new("")),
    };
    // Rank 0 chose the directory; the others learn its path.
    let path = comm.broadcast_string(&run.path.display().to_string(), 0)?;
    let run = if main {
        run
    } else {
        RunDir::at(Path::new(&path))
    };
    let _lock = if main { Some(run.lock()?) } else { None };
    let verbosity = if a.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Normal
    };
    if main {
        if comm.world() > 1 && !a.quiet {
            eprintln!(
                "data-parallel: {} ranks ({}), batch {} per rank = {} per step",
                comm.world(),
                comm.backend(),
                cfg.train.batch_size,
                cfg.train.batch_size * comm.world()
            );
        }
        trainer.add_callback(MetricsLogger::new(run.clone()));
        trainer.add_callback(Progress::new(verbosity, cfg.train.log_every));
    }
    if let Some(n) = a.abort_after_steps {
        trainer.add_callback(AbortAfter(n));
    }
    let summary = trainer
        .fit(&run, resume)
        .with_context(|| format!("run {}", run.path.display()))?;
    if !main {
        return Ok(());
    }
    if !a.quiet {
        let best = summary
            .best
            .as_ref()
            .map(|b| format!("best {} {:.4} at epoch {}", b.metric, b.value, b.epoch))
            .unwrap_or_default();
        eprintln!("{best}");
    }
    println!("{}", run.path.display());
    Ok(())
}
