//! `wick tune`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

use crate::tune::journal::{replay, Journal};
use crate::tune::report::{best, status_table, write_outputs};
use crate::tune::runner::TuneRun;
use crate::tune::study::TrialState;

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// A run config with a [tune] section.
    #[arg(required_unless_present = "status")]
    pub config: Option<PathBuf>,
    /// Override a config value (also inside [tune]), e.g. --set tune.n_trials=50.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the trials of a study (its directory or journal) and exit.
    #[arg(long, value_name = "STUDY", conflicts_with = "config")]
    pub status: Option<PathBuf>,
    /// Compute threads per trial process (default: all cores, or 1 with several workers).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print only the study directory.
    #[arg(long, short)]
    pub quiet: bool,
    /// Internal: run as an extra worker of a study started by another `wick tune`.
    #[arg(long, hide = true)]
    pub worker: Option<u32>,
}

pub fn run(a: TuneArgs) -> anyhow::Result<()> {
    if let Some(s) = &a.status {
        let journal = if s.is_dir() {
            s.join("journal.jsonl")
        } else {
            s.clone()
        };
        if !journal.is_file() {
            bail!("{}: no study journal here; pass the study directory (e.g. checkpoints/tune/<name>) or its journal.jsonl", s.display());
        }
        let trials = replay(&Journal::open(&journal)?.read_all()?);
        print!("{}", status_table(None, &trials));
        return Ok(());
    }
    let path = a
        .config
        .as_ref()
        .expect("clap requires CONFIG without --status");
    let cfg = crate::config::load(path, &a.set)?;
    let tr = TuneRun::new(&cfg, &path.display().to_string())?;
    let workers = tr.tune.workers;
    let threads = a
        .threads
        .unwrap_or(if workers > 1 { 1 } else { cfg.run.threads });
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    if let Some(w) = a.worker {
        tr.work(w, &mut |_, _| {})?;
        return Ok(());
    }
    std::fs::create_dir_all(&tr.dir).with_context(|| format!("creating {}", tr.dir.display()))?;
    let lock_path = tr.dir.join(".study.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| lock_path.display().to_string())?;
    if lock.try_lock().is_err() {
        bail!(
            "{}: another `wick tune` is running this study; wait for it or stop it",
            tr.dir.display()
        );
    }
    let retried = tr.recover()?;
    let quiet = a.quiet;
    if !quiet {
        eprintln!(
            "study {}: {} trials, {} {}, {:?} sampler, {:?} pruner, {} worker(s){}",
            tr.dir.display(),
            tr.tune.n_trials,
            match tr.direction {
                crate::tune::Direction::Maximize => "maximize",
                crate::tune::Direction::Minimize => "minimize",
            },
            tr.metric,
            tr.tune.sampler,
            tr.tune.pruner,
            workers,
            if retried > 0 {
                format!("; {retried} interrupted trial(s) marked failed and retried")
            } else {
                String::new()
            }
        );
    }
    // Extra workers are copies of this process sharing the journal.
    let mut children = Vec::new();
    for w in 1..workers {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("tune")
            .arg(path)
            .arg("--worker")
            .arg(w.to_string())
            .arg("--threads")
            .arg(threads.max(1).to_string());
        for s in &a.set {
            cmd.arg("--set").arg(s);
        }
        children.push(cmd.spawn().context("starting a tune worker")?);
    }
    let started = std::time::Instant::now();
    let n = tr.tune.n_trials;
    // A bar (trials done, best so far, ETA) on a terminal; a line per trial otherwise.
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} trials [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    let result = tr.work(0, &mut |t, all| {
        if quiet {
            return;
        }
        let finished = all
            .iter()
            .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
            .count();
        let best = best(&tr, all)
            .map(|b| format!("best {:.4} (trial {})", b.value.unwrap(), b.number))
            .unwrap_or_default();
        let line = format!(
            "trial {} {:?} {} = {} in {:.1}s{}",
            t.number,
            t.state,
            tr.metric,
            t.value
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into()),
            t.duration_s,
            t.note
                .as_ref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default(),
        );
        match &bar {
            Some(b) => {
                b.set_position(finished as u64);
                b.set_message(best);
                b.println(line);
            }
            None => {
                let eta = started.elapsed().as_secs_f64() / finished.max(1) as f64
                    * (n.saturating_sub(finished)) as f64;
                eprintln!("[{finished}/{n}] {line}; {best}; ETA {eta:.0}s");
            }
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for mut c in children {
        let _ = c.wait();
    }
    result?;
    let trials = replay(&Journal::open(&tr.journal)?.read_all()?);
    write_outputs(&tr, &trials)?;
    if !quiet {
        if let Some(b) = best(&tr, &trials) {
            eprintln!(
                "best trial {}: {} = {}; {}",
                b.number,
                tr.metric,
                b.value.unwrap(),
                tr.dir.join("best.toml").display()
            );
        }
    }
    println!("{}", tr.dir.display());
    drop(lock);
    Ok(())
}
