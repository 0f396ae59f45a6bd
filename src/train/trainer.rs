//! The training loop.

use std::sync::Arc;
use std::time::Instant;

use crate::config::{Config, Task};
use crate::data::loader::with_prefetch;
use crate::data::{open_sources, BatchPlan, Dataset, Schema, Source};
use crate::dist::{ddp, Communicator, GradReducer, Local};
use crate::model::{self, Grads, Loss, Model, ModelCtx, Param};
use crate::train::callback::{Callback, Control, EpochEnd, FitStart, StepEnd};
use crate::train::checkpoint::{self, Best, Checkpointer, TrainerState};
use crate::train::metrics::{self, higher_is_better, Metrics};
use crate::train::optim::{clip_grad_norm, Optimizer};
use crate::train::plot;
use crate::train::run_dir::{RunDir, Summary, CURVES_PNG};
use crate::train::schedule::Schedule;
use crate::{Error, Result};

/// Rows per forward pass during evaluation and prediction.
const EVAL_BATCH: usize = 1024;
/// Samples per forward pass when caching features.
const CACHE_BATCH: usize = 256;
/// Batches the loader keeps ready ahead of the training step.
const PREFETCH: usize = 4;

/// Drives a [`Model`] over a dataset: shuffled mini-batches, gradient accumulation, clipping,
/// optimizer and schedule, periodic evaluation, early stopping, checkpoints and hooks.
pub struct Trainer {
    pub cfg: Config,
    pub model: Box<dyn Model>,
    pub train: Box<dyn Source>,
    pub eval: Box<dyn Source>,
    pub schema: Schema,
    callbacks: Vec<Box<dyn Callback>>,
    /// The data-parallel world this trainer is one rank of ([`Local`] by default).
    comm: Arc<dyn Communicator>,
}

/// How an epoch's step loop ended.
enum EpochEnding {
    /// All batches done.
    Completed,
    /// A hook asked to stop gracefully.
    Stopped,
}

fn emit_step(cbs: &mut [Box<dyn Callback>], s: &StepEnd) -> Result<Control> {
    let mut ctl = Control::Continue;
    for cb in cbs.iter_mut() {
        match cb.on_step_end(s)? {
            Control::Continue => {}
            Control::Abort => return Ok(Control::Abort),
            Control::Stop => ctl = Control::Stop,
        }
    }
    Ok(ctl)
}

fn emit_epoch(cbs: &mut [Box<dyn Callback>], e: &EpochEnd) -> Result<Control> {
    let mut ctl = Control::Continue;
    for cb in cbs.iter_mut() {
        match cb.on_epoch_end(e)? {
            Control::Continue => {}
            Control::Abort => return Ok(Control::Abort),
            Control::Stop => ctl = Control::Stop,
        }
    }
    Ok(ctl)
}

/// Everything one run of the step loop needs besides the data.
struct StepCtx<'a> {
    model: &'a dyn Model,
    callbacks: &'a mut Vec<Box<dyn Callback>>,
    params: &'a [Param],
    grads: &'a mut Grads,
    opt: &'a mut Optimizer,
    sched: &'a Schedule,
    st: &'a mut TrainerState,
    run: &'a RunDir,
    cfg: &'a Config,
    loss: Loss,
    /// Batches hold cached features (see [`Model::cached_features`]).
    cached: bool,
    comm: &'a dyn Communicator,
    reducer: &'a mut GradReducer,
    /// Seconds spent in communication so far.
    comm_s: &'a mut f64,
    /// Rank 0's checkpoint writer.
    ckpt: &'a mut Checkpointer,
}

impl StepCtx<'_> {
    /// Trains on batches `st.batch..nb` of `epoch`, as they arrive.
    fn run_epoch(
        &mut self,
        epoch: usize,
        nb: usize,
        batches: &mut dyn Iterator<Item = (usize, Result<crate::data::Batch>)>,
    ) -> Result<EpochEnding> {
        let t = &self.cfg.train;
        let seed = self.cfg.run.seed;
        let store = self.model.store().clone();
        let mut step_loss = 0f64;
        let mut clock = Instant::now();
        for (b, batch) in batches {
            let batch = batch?;
            let group_start = (b / t.accumulate) * t.accumulate;
            let group_len = t.accumulate.min(nb - group_start);
            // Each rank draws its own dropout masks; rank 0 draws those of a single process.
            let rank_seed =
                seed.wrapping_add((self.comm.rank() as u64).wrapping_mul(RANK_SEED_STRIDE));
            let mut ctx = ModelCtx::train(rank_seed, ((epoch as u64) << 32) | b as u64)
                .with_cached_features(self.cached);
            let loss = self.model.loss_and_grad(
                &batch,
                self.loss,
                &mut ctx,
                self.params,
                self.grads,
                1.0 / group_len as f32,
            )?;
            let st = &mut *self.st;
            if !loss.is_finite() {
                return Err(Error::Train(format!(
                    "the loss became {loss} at epoch {} step {}; lower optim.lr or set train.clip_norm",
                    epoch + 1,
                    st.step + 1
                )));
            }
            st.epoch_loss_sum += loss;
            st.epoch_batches += 1;
            st.samples += (batch.n * self.comm.world()) as u64;
            step_loss += loss / group_len as f64;
            if b + 1 < group_start + group_len {
                continue;
            }
            let waited = Instant::now();
            self.reducer.all_reduce_mean(self.comm, self.grads)?;
            *self.comm_s += waited.elapsed().as_secs_f64();
            for cb in self.callbacks.iter_mut() {
                cb.on_after_backward(self.grads)?;
            }
            if t.clip_norm > 0.0 {
                clip_grad_norm(self.grads, t.clip_norm);
            }
            let lr = self.sched.lr(st.step);
            self.opt.step(self.params, self.grads, lr)?;
            self.grads.zero();
            st.step += 1;
            st.batch = b + 1;
            st.train_time_s += clock.elapsed().as_secs_f64();
            let info = StepEnd {
                epoch,
                step: st.step,
                loss: step_loss,
                lr,
                samples: st.samples,
                samples_per_s: st.samples as f64 / st.train_time_s.max(1e-9),
            };
            step_loss = 0.0;
            let ctl = emit_step(self.callbacks, &info)?;
            let waited = Instant::now();
            let ctl = agree(self.comm, ctl)?;
            *self.comm_s += waited.elapsed().as_secs_f64();
            if ctl == Control::Abort {
                return Err(Error::Train(format!(
                    "aborted after step {} as requested; `wick train --resume {}` continues",
                    st.step,
                    self.run.path.display()
                )));
            }
            if self.comm.is_main()
                && t.checkpoint_every > 0
                && st.step.is_multiple_of(t.checkpoint_every as u64)
            {
                self.ckpt.save(
                    &[self.run.checkpoint("last")],
                    &store,
                    self.params,
                    self.opt,
                    st,
                )?;
            }
            clock = Instant::now();
            if ctl == Control::Stop {
                return Ok(EpochEnding::Stopped);
            }
        }
        Ok(EpochEnding::Completed)
    }
}

impl Trainer {
    /// Loads the data and builds the model described by `cfg`.
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let (train, eval, schema) = open_sources(&cfg.data, cfg.run.seed)?;
        let shape = model::sample_shape(&cfg.model, &schema);
        let train = crate::data::shift_training(train, &cfg.data, shape, schema.input_dim)?;
        let device = cfg.run.candle_device()?;
        let model = model::build(&cfg.model, &schema, cfg.run.seed, &device)?;
        Ok(Self::new(cfg.clone(), model, train, eval, schema))
    }

    /// A trainer for any model (see [`Model`]) and data sources.
    pub fn new(
        cfg: Config,
        model: Box<dyn Model>,
        train: Box<dyn Source>,
        eval: Box<dyn Source>,
        schema: Schema,
    ) -> Self {
        Self {
            cfg,
            model,
            train,
            eval,
            schema,
            callbacks: Vec::new(),
            comm: Arc::new(Local),
        }
    }

    /// Makes this trainer one rank of a data-parallel job: `train.batch_size` becomes the
    /// per-rank batch, gradients are averaged across ranks after every backward, metrics are
    /// reduced, and only rank 0 writes checkpoints and the summary.
    pub fn set_communicator(&mut self, comm: Arc<dyn Communicator>) {
        self.comm = comm;
    }

    /// The data-parallel world this trainer is part of.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Adds a hook; hooks run in the order they were added.
    pub fn add_callback(&mut self, cb: impl Callback + 'static) {
        self.callbacks.push(Box::new(cb));
    }

    /// This rank's batches of training epoch `epoch`: its share of each global batch of
    /// `train.batch_size` × world rows.
    pub fn plan(&self, epoch: u64) -> BatchPlan {
        let (t, d, seed) = (&self.cfg.train, &self.cfg.data, self.cfg.run.seed);
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let global = t.batch_size * world;
        let plan = match (d.shuffle, self.train.blocks()) {
            (crate::config::Shuffle::Block, Some(blocks)) => BatchPlan::block_shuffled(
                &blocks,
                d.shuffle_window,
                global,
                t.drop_last,
                seed,
                epoch,
            ),
            _ => BatchPlan::shuffled(self.train.len(), global, t.drop_last, seed, epoch),
        };
        match world {
            1 => plan,
            _ => plan.for_rank(rank, world),
        }
    }

    /// The metric that selects `best` and drives early stopping.
    pub fn monitor(&self) -> String {
        self.cfg
            .train
            .monitor
            .clone()
            .unwrap_or_else(|| match self.schema.task {
                Task::Regression => "eval_loss".into(),
                _ => "eval_accuracy".into(),
            })
    }

    /// Metrics of the model on `ds`, without prefix (`loss`, `accuracy`, `f1` / `mse`, `mae`).
    pub fn evaluate(&self, ds: &dyn Source) -> Result<Metrics> {
        self.evaluate_on(ds, false)
    }

    /// As [`Self::evaluate`]; with `cached`, `ds` holds the model's cached features.
    fn evaluate_on(&self, ds: &dyn Source, cached: bool) -> Result<Metrics> {
        let out = predict_sharded(
            self.model.as_ref(),
            ds,
            cached,
            self.schema.outputs(),
            self.comm.as_ref(),
        )?;
        if let Some(v) = out.iter().find(|v| !v.is_finite()) {
            return Err(Error::Train(format!(
                "the model produced {v} on the evaluation data: training diverged or an input is extreme; lower optim.lr, set train.clip_norm or check the data"
            )));
        }
        Ok(metrics::evaluate(
            &out,
            self.schema.outputs(),
            &ds.targets()?,
        ))
    }

    /// The checks [`Self::fit`] starts with, which need the data and the world but no run
    /// directory: call it before creating one, so that a config that cannot train leaves
    /// nothing behind.
    pub fn check(&self) -> Result<()> {
        let t = &self.cfg.train;
        let world = self.comm.world();
        if self.model.store().trainable().is_empty() {
            return Err(Error::Train("the model has no trainable parameters".into()));
        }
        let n = self.train.len();
        let batches =
            BatchPlan::shuffled(n, t.batch_size * world, t.drop_last, self.cfg.run.seed, 0).len();
        if batches == 0 {
            return Err(Error::Config(format!(
                "train.batch_size = {} × {world} ranks with drop_last leaves no batch of the {n} training rows; lower the batch size",
                t.batch_size
            )));
        }
        let monitor = self.monitor();
        let valid = crate::config::monitor_names(self.schema.task);
        if !valid.contains(&monitor.as_str()) {
            return Err(Error::Config(format!(
                "train.monitor = \"{monitor}\" is not reported for this {:?} task; use one of {}",
                self.schema.task,
                valid.join(", ")
            )));
        }
        Ok(())
    }

    /// Trains into `run`. With `resume`, continues from `run`'s `last` checkpoint and ends
    /// with exactly the weights an uninterrupted run would have.
    pub fn fit(&mut self, run: &RunDir, resume: bool) -> Result<Summary> {
        self.check()?;
        let wall = Instant::now();
        let cfg = self.cfg.clone();
        let seed = cfg.run.seed;
        let t = &cfg.train;
        let store = self.model.store().clone();
        let comm = self.comm.clone();
        let (world, main) = (comm.world(), comm.is_main());
        let params = store.trainable();
        let mut grads = Grads::zeros(&params);
        let mut opt = Optimizer::new(&cfg.optim, &params);
        let loss_kind = Loss::for_task(self.schema.task);
        let n = self.train.len();
        let batches = BatchPlan::shuffled(n, t.batch_size * world, t.drop_last, seed, 0).len();
        let steps_per_epoch = batches.div_ceil(t.accumulate) as u64;
        let total_steps = steps_per_epoch * t.epochs as u64;
        let sched = Schedule::new(&cfg.schedule, cfg.optim.lr, total_steps, steps_per_epoch);
        let monitor = self.monitor();
        let hash = cfg.hash();
        // Rank 0's copy of config.toml is the one that counts (other machines may lack it).
        let file_hash = match main {
            true => comm.broadcast_string(&run.config_file_hash()?, 0)?,
            false => comm.broadcast_string("", 0)?,
        };

        // Rank 0 decides; under DDP every rank then reads the same checkpoint, which needs the
        // run directory on a filesystem they all see.
        let here = checkpoint::locate(&run.checkpoint("last")).is_ok();
        let mut has = [here as u8];
        comm.broadcast_bytes(&mut has, 0)?;
        let has_checkpoint = has[0] == 1;
        if resume && has_checkpoint && !here {
            return Err(Error::Checkpoint(format!(
                "rank {} cannot read {}: resuming a data-parallel run needs its run directory on a filesystem every rank sees",
                comm.rank(),
                run.checkpoint("last").display()
            )));
        }
        let mut st = if resume && has_checkpoint {
            let st = checkpoint::load(&run.checkpoint("last"), &store, &params, &mut opt)?;
            if st.config_file != file_hash {
                return Err(Error::Checkpoint(format!(
                    "{}: config.toml changed since the checkpoint was written; restore it or start a new run",
                    run.path.display(),
                )));
            }
            if st.step != opt.steps() {
                return Err(Error::Checkpoint(format!(
                    "{}: trainer.json is at step {} but the optimizer state at step {}; the checkpoint is corrupt",
                    run.path.display(),
                    st.step,
                    opt.steps()
                )));
            }
            if main {
                run.truncate_metrics(st.epoch)?;
            }
            st
        } else {
            // A fresh run, or one that died before its first checkpoint: start at step 0.
            if resume && main {
                run.truncate_metrics(0)?;
            }
            TrainerState::new(&hash, &file_hash, seed)
        };
        // Equal replicas: rank 0's weights (and buffers) everywhere.
        ddp::broadcast_params(comm.as_ref(), &store.params())?;
        store.invalidate_derived();
        let mut reducer = GradReducer::new(cfg.dist.bucket_mb);
        let mut comm_s = 0f64;
        let mut ckpt = Checkpointer::new();

        let caching = self.model.cached_features().is_some()
            && t.cache_features
            && !self.train.augments()
            && !stop_before(&st, t.epochs);
        let start = FitStart {
            epochs: t.epochs,
            steps_per_epoch,
            total_steps,
            start_step: st.step,
            train_samples: n,
            eval_samples: self.eval.len(),
            num_params: store.num_params(),
            cached_features: caching,
        };
        for cb in self.callbacks.iter_mut() {
            cb.on_fit_start(&start)?;
        }

        // A frozen, deterministic backbone: compute its features once, train the head on them.
        let cache = match caching {
            true => {
                let clock = Instant::now();
                // Each rank computes its share of the features; all ranks get all of them.
                let train =
                    cache_features(self.model.as_ref(), self.train.as_ref(), comm.as_ref())?;
                let eval = cache_features(self.model.as_ref(), self.eval.as_ref(), comm.as_ref())?;
                st.train_time_s += clock.elapsed().as_secs_f64();
                Some((train, eval))
            }
            false => None,
        };
        let cached = cache.is_some();
        let (train_src, eval_src): (&dyn Source, &dyn Source) = match &cache {
            Some((t, e)) => (t, e),
            None => (self.train.as_ref(), self.eval.as_ref()),
        };

        let device = store.device().clone();
        let mut last_metrics = Metrics::new();
        let mut stop = stop_before(&st, t.epochs);
        while !stop && st.epoch < t.epochs {
            let epoch = st.epoch;
            let plan = self.plan(epoch as u64);
            let nb = plan.len();
            let mut sc = StepCtx {
                model: self.model.as_ref(),
                callbacks: &mut self.callbacks,
                params: &params,
                grads: &mut grads,
                opt: &mut opt,
                sched: &sched,
                st: &mut st,
                run,
                cfg: &cfg,
                loss: loss_kind,
                cached,
                comm: comm.as_ref(),
                reducer: &mut reducer,
                comm_s: &mut comm_s,
                ckpt: &mut ckpt,
            };
            let first = sc.st.batch;
            let ending = with_prefetch(
                train_src,
                &plan,
                first..nb,
                &device,
                if train_src.prefetch() { PREFETCH } else { 0 },
                |batches| sc.run_epoch(epoch, nb, batches),
            )?;
            if let EpochEnding::Stopped = ending {
                if main {
                    ckpt.save(&[run.checkpoint("last")], &store, &params, &opt, &st)?;
                }
                break;
            }
            // Buffers that training updates (BatchNorm running statistics) follow rank 0.
            ddp::broadcast_params(comm.as_ref(), &store.buffers())?;
            let mut loss = [st.epoch_loss_sum, st.epoch_batches as f64];
            ddp::sum_f64(comm.as_ref(), &mut loss)?;

            // End of epoch: evaluate, track the best, early stopping, checkpoint.
            let mut m = Metrics::new();
            m.insert("epoch".into(), (epoch + 1) as f64);
            m.insert("step".into(), st.step as f64);
            m.insert("lr".into(), sched.lr(st.step.saturating_sub(1)));
            m.insert("train_loss".into(), loss[0] / loss[1].max(1.0));
            let evaluated = (epoch + 1) % t.eval_every == 0 || epoch + 1 == t.epochs;
            if evaluated {
                for (k, v) in self.evaluate_on(eval_src, cached)? {
                    m.insert(format!("eval_{k}"), v);
                }
            }
            let mut is_best = false;
            if let Some(&v) = m.get(&monitor) {
                let hib = higher_is_better(&monitor);
                let better = |a: f64, b: f64, delta: f64| {
                    if hib {
                        a > b + delta
                    } else {
                        a < b - delta
                    }
                };
                is_best = st.best.as_ref().is_none_or(|b| better(v, b.value, 0.0));
                if let Some(es) = &t.early_stopping {
                    let improved = st
                        .best
                        .as_ref()
                        .is_none_or(|b| better(v, b.value, es.min_delta));
                    st.bad_evals = if improved { 0 } else { st.bad_evals + 1 };
                    if st.bad_evals >= es.patience {
                        st.stopped_early = true;
                    }
                }
                if is_best {
                    st.best = Some(Best {
                        metric: monitor.clone(),
                        value: v,
                        epoch: epoch + 1,
                        step: st.step,
                    });
                }
            }
            st.epoch = epoch + 1;
            st.batch = 0;
            st.epoch_loss_sum = 0.0;
            st.epoch_batches = 0;
            let e = EpochEnd {
                epoch: epoch + 1,
                step: st.step,
                metrics: m.clone(),
                evaluated,
                is_best,
            };
            let ctl = agree(comm.as_ref(), emit_epoch(&mut self.callbacks, &e)?)?;
            if ctl == Control::Abort {
                return Err(Error::Train(format!(
                    "aborted after epoch {} as requested",
                    epoch + 1
                )));
            }
            stop = st.stopped_early || ctl == Control::Stop;
            if main {
                let mut dirs = Vec::new();
                if is_best {
                    dirs.push(run.checkpoint("best"));
                }
                if stop || st.epoch == t.epochs || st.epoch.is_multiple_of(t.save_every) {
                    dirs.push(run.checkpoint("last"));
                }
                if !dirs.is_empty() {
                    ckpt.save(&dirs, &store, &params, &opt, &st)?;
                }
            }
            if evaluated {
                last_metrics = m;
            }
        }

        // The run is complete only once its checkpoints are on disk.
        ckpt.finish()?;
        if last_metrics.is_empty() && main {
            if let Some(row) = run
                .metrics()?
                .into_iter()
                .rev()
                .find(|r| r.contains_key("eval_loss"))
            {
                last_metrics = row;
            }
        }
        if main {
            let rows = run.metrics()?;
            plot::draw(&run.path.join(CURVES_PNG), &rows, &cfg.run.name)?;
        }
        let summary = Summary {
            name: cfg.run.name.clone(),
            wick_version: crate::VERSION.into(),
            config_hash: hash,
            seed,
            model: self.model.kind().to_string(),
            num_params: store.num_params(),
            epochs_completed: st.epoch,
            steps: st.step,
            stopped_early: st.stopped_early,
            final_metrics: last_metrics,
            best: st.best.clone(),
            wall_time_s: wall.elapsed().as_secs_f64(),
            train_time_s: st.train_time_s,
            train_samples_per_s: st.samples as f64 / st.train_time_s.max(1e-9),
            comm_time_s: comm_s,
        };
        if main {
            run.write_summary(&summary)?;
        }
        // No rank returns before the summary is written.
        comm.barrier()?;
        for cb in self.callbacks.iter_mut() {
            cb.on_fit_end(&summary)?;
        }
        Ok(summary)
    }
}

/// Model outputs (`n × outputs`, row-major) for every sample of `ds`, in evaluation mode.
pub fn predict(model: &dyn Model, ds: &dyn Source) -> Result<Vec<f32>> {
    predict_with(model, ds, false)
}

/// As [`predict`]; with `cached`, `ds` holds the model's cached features.
fn predict_with(model: &dyn Model, ds: &dyn Source, cached: bool) -> Result<Vec<f32>> {
    predict_rows(model, ds, cached, 0..ds.len())
}

/// As [`predict_with`] for a model of `width` outputs, each rank of `comm` computing its
/// share of the rows; every rank returns all of them.
fn predict_sharded(
    model: &dyn Model,
    ds: &dyn Source,
    cached: bool,
    width: usize,
    comm: &dyn Communicator,
) -> Result<Vec<f32>> {
    ddp::gather_rows(comm, ds.len(), width, "outputs", |rows| {
        predict_rows(model, ds, cached, rows)
    })
}

/// Model outputs for rows `rows` of `ds`, in evaluation mode.
fn predict_rows(
    model: &dyn Model,
    ds: &dyn Source,
    cached: bool,
    rows: std::ops::Range<usize>,
) -> Result<Vec<f32>> {
    let device = model.store().device().clone();
    let batch = if cached {
        EVAL_BATCH
    } else {
        EVAL_BATCH.min(model.eval_batch()).max(1)
    };
    let plan = BatchPlan::sequential_range(rows, batch);
    let mut out = Vec::new();
    for i in 0..plan.len() {
        let b = plan.batch(ds, i, &device)?;
        let mut ctx = ModelCtx::eval()
            .with_cached_features(cached)
            .with_mask(b.mask.clone());
        let y = model.forward(&b.x, &mut ctx)?;
        out.extend(y.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Seeds of ranks 1, 2, … are this far apart, so their dropout streams never meet.
const RANK_SEED_STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;

/// The loop's next move as every rank will take it: any rank's abort or stop applies to all,
/// so ranks never part ways (one waiting in a collective the others skipped).
fn agree(comm: &dyn Communicator, ctl: Control) -> Result<Control> {
    if comm.world() == 1 {
        return Ok(ctl);
    }
    let mut votes = [
        (ctl == Control::Stop) as u8 as f64,
        (ctl == Control::Abort) as u8 as f64,
    ];
    comm.all_reduce_sum_f64(&mut votes)?;
    Ok(if votes[1] > 0.0 {
        Control::Abort
    } else if votes[0] > 0.0 {
        Control::Stop
    } else {
        Control::Continue
    })
}

/// Whether a run in state `st` has nothing left to train.
fn stop_before(st: &TrainerState, epochs: usize) -> bool {
    st.stopped_early || st.epoch >= epochs
}

/// The model's cached features ([`Model::features`]) of every sample of `ds`, in memory, with
/// the same targets. Each rank of `comm` computes the features of its share of the samples, and
/// every rank returns all of them (each value comes from one rank, the others add zeros, so the
/// sum is exact).
pub fn cache_features(
    model: &dyn Model,
    ds: &dyn Source,
    comm: &dyn Communicator,
) -> Result<Dataset> {
    let device = model.store().device().clone();
    let dim = model.cached_features().unwrap_or(0);
    let n = ds.len();
    let x = ddp::gather_rows(comm, n, dim, "cached features", |rows| {
        let plan = BatchPlan::sequential_range(rows, CACHE_BATCH.min(model.eval_batch()).max(1));
        let mut x = Vec::new();
        for i in 0..plan.len() {
            let b = plan.batch(ds, i, &device)?;
            let f = model.features(&b.x, b.mask.as_ref())?;
            x.extend(f.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(x)
    })?;
    Ok(Dataset {
        x,
        n,
        d: dim,
        y: ds.targets()?,
    })
}
