//! Study outputs: `trials.csv`, `best.toml`, `history.png`, `params.png`, and the status table.

use std::path::Path;

use plotters::prelude::*;

use super::runner::TuneRun;
use super::study::{FrozenTrial, TrialState};
use crate::io::write_atomic;
use crate::{Error, Result};

fn state_name(s: TrialState) -> &'static str {
    match s {
        TrialState::Running => "running",
        TrialState::Complete => "complete",
        TrialState::Pruned => "pruned",
        TrialState::Failed => "failed",
    }
}

/// The best complete trial.
pub fn best<'a>(tr: &TuneRun, trials: &'a [FrozenTrial]) -> Option<&'a FrozenTrial> {
    trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .fold(None, |b: Option<&FrozenTrial>, t| match b {
            Some(b) if !tr.direction.better(t.value.unwrap(), b.value.unwrap()) => Some(b),
            _ => Some(t),
        })
}

/// One row per trial: number, state, value, duration, steps reported, then each parameter.
pub fn trials_csv(tr: &TuneRun, trials: &[FrozenTrial]) -> String {
    let mut out = format!(
        "number,state,{},duration_s,steps,{}\n",
        tr.metric,
        tr.space
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    for t in trials {
        let params: Vec<String> = tr
            .space
            .iter()
            .map(|(k, d)| match t.params.get(k) {
                Some(&v) => format!("\"{}\"", d.to_value(v).to_string().replace('"', "'")),
                None => String::new(),
            })
            .collect();
        out += &format!(
            "{},{},{},{:.3},{},{}\n",
            t.number,
            state_name(t.state),
            t.value.map(|v| v.to_string()).unwrap_or_default(),
            t.duration_s,
            t.intermediate.len(),
            params.join(",")
        );
    }
    out
}

/// Writes `trials.csv`, `best.toml` and the plots into the study directory.
pub fn write_outputs(tr: &TuneRun, trials: &[FrozenTrial]) -> Result<()> {
    write_atomic(
        &tr.dir.join("trials.csv"),
        trials_csv(tr, trials).as_bytes(),
    )?;
    if let Some(b) = best(tr, trials) {
        let cfg = tr.trial_config(&b.params)?;
        let text = format!(
            "# Best trial {} of the study in {}: {} = {}.\n# `wick train` on this file reproduces it.\n{}",
            b.number,
            tr.dir.display(),
            tr.metric,
            b.value.unwrap(),
            cfg.to_toml()
        );
        write_atomic(&tr.dir.join("best.toml"), text.as_bytes())?;
    }
    history_png(&tr.dir.join("history.png"), tr, trials)?;
    params_png(&tr.dir.join("params.png"), tr, trials)?;
    Ok(())
}

fn plot_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

fn history_png(path: &Path, tr: &TuneRun, trials: &[FrozenTrial]) -> Result<()> {
    crate::train::plot::register_font();
    let err = plot_err(path);
    let done: Vec<(f64, f64)> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .map(|t| (t.number as f64, t.value.unwrap()))
        .collect();
    let mut best_so_far = Vec::new();
    let mut best: Option<f64> = None;
    for &(x, v) in &done {
        if best.is_none_or(|b| tr.direction.better(v, b)) {
            best = Some(v);
        }
        best_so_far.push((x, best.unwrap()));
    }
    let root = BitMapBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (lo, hi) = range(done.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("optimization history: {}", tr.metric),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(trials.len().max(1) as f64), lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("trial")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(done.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(best_so_far, RED.stroke_width(2)))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn params_png(path: &Path, tr: &TuneRun, trials: &[FrozenTrial]) -> Result<()> {
    crate::train::plot::register_font();
    let err = plot_err(path);
    let n = tr.space.len().max(1);
    let root = BitMapBackend::new(path, (320 * n as u32, 320)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, n));
    let done: Vec<&FrozenTrial> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .collect();
    let (lo, hi) = range(done.iter().map(|t| t.value.unwrap()));
    for ((name, dist), area) in tr.space.iter().zip(panels.iter()) {
        let log = matches!(
            dist,
            super::space::Distribution::Float { log: true, .. }
                | super::space::Distribution::Int { log: true, .. }
        );
        let x = |v: f64| if log { v.log10() } else { v };
        let pts: Vec<(f64, f64)> = done
            .iter()
            .filter_map(|t| Some((x(*t.params.get(name)?), t.value.unwrap())))
            .collect();
        let (xl, xh) = range(pts.iter().map(|p| p.0));
        let mut chart = ChartBuilder::on(area)
            .caption(
                if log {
                    format!("{name} (log10)")
                } else {
                    name.clone()
                },
                ("sans-serif", 14),
            )
            .margin(8)
            .x_label_area_size(25)
            .y_label_area_size(50)
            .build_cartesian_2d(xl..xh, lo..hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The `--status` table.
pub fn status_table(tr: Option<&TuneRun>, trials: &[FrozenTrial]) -> String {
    let mut out = format!(
        "{:>6} {:<9} {:>12} {:>9} {:>6}  params\n",
        "trial", "state", "value", "seconds", "steps"
    );
    for t in trials {
        let params: Vec<String> = t
            .params
            .iter()
            .map(|(k, &v)| match t.distributions.get(k) {
                Some(d) => format!("{k}={}", d.to_value(v)),
                None => format!("{k}={v}"),
            })
            .collect();
        out += &format!(
            "{:>6} {:<9} {:>12} {:>9.1} {:>6}  {}\n",
            t.number,
            state_name(t.state),
            t.value
                .map(|v| format!("{v:.6}"))
                .unwrap_or_else(|| "-".into()),
            t.duration_s,
            t.intermediate.len(),
            params.join(" ")
        );
    }
    if let Some(tr) = tr {
        if let Some(b) = best(tr, trials) {
            out += &format!(
                "best: trial {} with {} = {}\n",
                b.number,
                tr.metric,
                b.value.unwrap()
            );
        }
    }
    out
}
