//! `wick runs`.

use std::path::PathBuf;

use clap::Args;

use crate::train::RunDir;

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Directory holding run directories.
    #[arg(default_value = "checkpoints/runs")]
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: RunsArgs) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(&a.dir).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot list runs: {e}; pass the directory that holds run directories",
            a.dir.display()
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(crate::train::run_dir::CONFIG_FILE).is_file())
        .collect();
    dirs.sort();
    let mut rows = Vec::new();
    for d in dirs {
        let run = RunDir::open(&d)?;
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        let cfg = run.config().ok();
        let (seed, hash) = cfg
            .as_ref()
            .map(|c| (c.run.seed.to_string(), c.hash()))
            .unwrap_or_else(|| ("?".into(), "?".into()));
        let summary = run.summary().ok();
        rows.push((name, seed, hash, summary));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, s, h, sum)| serde_json::json!({"run": n, "seed": s, "config_hash": h, "summary": sum}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<40} {:>6} {:<12} {:>6} {:>9} {:>9} {:>9} {:>8}",
        "run", "seed", "config", "epochs", "eval_loss", "eval_acc", "best", "wall_s"
    );
    for (name, seed, hash, s) in rows {
        match s {
            Some(s) => {
                let get = |k: &str| {
                    s.final_metrics
                        .get(k)
                        .map(|v| format!("{v:.4}"))
                        .unwrap_or_else(|| "-".into())
                };
                let best = s
                    .best
                    .as_ref()
                    .map(|b| format!("{:.4}", b.value))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{name:<40} {seed:>6} {hash:<12} {:>6} {:>9} {:>9} {best:>9} {:>8.1}",
                    s.epochs_completed,
                    get("eval_loss"),
                    get("eval_accuracy"),
                    s.wall_time_s
                );
            }
            None => println!("{name:<40} {seed:>6} {hash:<12} (unfinished)"),
        }
    }
    Ok(())
}
