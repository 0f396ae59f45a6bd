//! Built-in callbacks that report: a progress bar (or plain log lines when stderr is not a
//! terminal) and the metrics files.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::train::callback::{Callback, Control, EpochEnd, FitStart, StepEnd};
use crate::train::run_dir::RunDir;
use crate::Result;

/// How much to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
}

/// Shows progress on stderr: an indicatif bar on a terminal, otherwise a line every
/// `log_every` steps and one per epoch.
pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: usize,
    epochs: usize,
    total: u64,
    quiet: bool,
    started: Instant,
}

impl Progress {
    pub fn new(verbosity: Verbosity, log_every: usize) -> Self {
        Self {
            bar: None,
            log_every: log_every.max(1),
            epochs: 0,
            total: 0,
            quiet: verbosity == Verbosity::Quiet,
            started: Instant::now(),
        }
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.1}")
    }
}

impl Callback for Progress {
    fn on_fit_start(&mut self, info: &FitStart) -> Result<()> {
        self.epochs = info.epochs;
        self.total = info.total_steps;
        self.started = Instant::now();
        if self.quiet {
            return Ok(());
        }
        eprintln!(
            "training: {} train / {} eval samples, {} parameters, {} epochs × {} steps{}",
            info.train_samples,
            info.eval_samples,
            info.num_params,
            info.epochs,
            info.steps_per_epoch,
            if info.start_step > 0 {
                format!(", resuming at step {}", info.start_step)
            } else {
                String::new()
            }
        );
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(info.total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            bar.set_position(info.start_step);
            self.bar = Some(bar);
        }
        Ok(())
    }

    fn on_step_end(&mut self, s: &StepEnd) -> Result<Control> {
        if self.quiet {
            return Ok(Control::Continue);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(s.step);
            if s.step.is_multiple_of(10) {
                bar.set_message(format!(
                    "epoch {} loss {:.4} {} samples/s",
                    s.epoch + 1,
                    s.loss,
                    fmt_rate(s.samples_per_s)
                ));
            }
        } else if s.step.is_multiple_of(self.log_every as u64) {
            eprintln!(
                "epoch {}/{} step {}/{} loss {:.4} lr {:.3e} {} samples/s",
                s.epoch + 1,
                self.epochs,
                s.step,
                self.total,
                s.loss,
                s.lr,
                fmt_rate(s.samples_per_s)
            );
        }
        Ok(Control::Continue)
    }

    fn on_epoch_end(&mut self, e: &EpochEnd) -> Result<Control> {
        if self.quiet {
            return Ok(Control::Continue);
        }
        let parts: Vec<String> = e
            .metrics
            .iter()
            .filter(|(k, _)| k.starts_with("eval_") || k.as_str() == "train_loss")
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        let line = format!(
            "epoch {}/{}: {}{}",
            e.epoch,
            self.epochs,
            parts.join(" "),
            if e.is_best { " (best)" } else { "" }
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
        Ok(Control::Continue)
    }

    fn on_fit_end(&mut self, s: &crate::train::Summary) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!(
                "done in {:.1}s: {} steps, {} train samples/s",
                self.started.elapsed().as_secs_f64(),
                s.steps,
                fmt_rate(s.train_samples_per_s)
            );
        }
        Ok(())
    }
}

/// Adds one row per epoch to `metrics.jsonl` and `metrics.csv`.
pub struct MetricsLogger {
    run: RunDir,
}

impl MetricsLogger {
    pub fn new(run: RunDir) -> Self {
        Self { run }
    }
}

impl Callback for MetricsLogger {
    fn on_epoch_end(&mut self, e: &EpochEnd) -> Result<Control> {
        self.run.append_metrics(&e.metrics)?;
        Ok(Control::Continue)
    }
}
