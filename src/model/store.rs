//! [`ParamStore`]: named parameters, initialised from the run seed.
//!
//! The store is a candle `VarBuilder` backend: a model built through
//! [`ParamStore::var_builder`] gets each parameter from the keyed stream
//! `(seed, parameter name)`, so initial weights do not depend on construction order, thread
//! count or candle's (unseedable) CPU RNG. Parameters are listed sorted by name.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};

use crate::quant::{Calibration, QTensor};
use crate::rng::Rng;
use crate::{Error, Result};

/// A named parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// PyTorch-style state-dict name, e.g. `layers.0.weight`.
    pub name: String,
    pub var: Var,
    /// Frozen parameters get no gradient and no optimizer state.
    pub trainable: bool,
}

#[derive(Debug)]
struct Entry {
    var: Var,
    trainable: bool,
    /// A buffer (e.g. BatchNorm running statistics): saved and loaded, never trained.
    buffer: bool,
}

#[derive(Debug)]
struct Inner {
    seed: u64,
    device: Device,
    vars: Mutex<BTreeMap<String, Entry>>,
    /// int8 weights by parameter name (see [`crate::quant`]).
    quant: RwLock<BTreeMap<String, Arc<QTensor>>>,
    /// Set while [`crate::quant`] records layer inputs.
    calibrating: AtomicBool,
    calibration: Mutex<Calibration>,
    /// Values derived from frozen parameters, by parameter name ([`ParamStore::derived`]).
    derived: Derived,
}

/// Values derived from frozen parameters (such as convolution weights repacked for a
/// kernel), dropped whenever the store's values may have changed.
#[derive(Default)]
struct Derived(Mutex<BTreeMap<String, Arc<dyn Any + Send + Sync>>>);

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Derived({n} values)")
    }
}

impl Derived {
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Named parameters of a model, initialised deterministically from a seed.
#[derive(Debug, Clone)]
pub struct ParamStore {
    inner: Arc<Inner>,
}

impl ParamStore {
    /// An empty store on the CPU.
    pub fn new(seed: u64) -> Self {
        Self::with_device(seed, Device::Cpu)
    }

    /// An empty store on `device`.
    pub fn with_device(seed: u64, device: Device) -> Self {
        Self {
            inner: Arc::new(Inner {
                seed,
                device,
                vars: Mutex::new(BTreeMap::new()),
                quant: RwLock::new(BTreeMap::new()),
                calibrating: AtomicBool::new(false),
                calibration: Mutex::new(Calibration::default()),
                derived: Derived::default(),
            }),
        }
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// A candle `VarBuilder` whose variables live in this store.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(self.clone()),
            DType::F32,
            self.inner.device.clone(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.vars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// All parameters, sorted by name.
    pub fn params(&self) -> Vec<Param> {
        self.lock()
            .iter()
            .map(|(name, e)| Param {
                name: name.clone(),
                var: e.var.clone(),
                trainable: e.trainable,
            })
            .collect()
    }

    /// Trainable parameters, sorted by name.
    pub fn trainable(&self) -> Vec<Param> {
        self.params().into_iter().filter(|p| p.trainable).collect()
    }

    /// Buffers (e.g. BatchNorm running statistics), sorted by name.
    pub fn buffers(&self) -> Vec<Param> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.buffer)
            .map(|(name, e)| Param {
                name: name.clone(),
                var: e.var.clone(),
                trainable: false,
            })
            .collect()
    }

    /// The variable called `name`. Changing a frozen parameter's values through it must be
    /// followed by [`Self::invalidate_derived`] (the store's own loaders do that).
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().get(name).map(|e| e.var.clone())
    }

    /// A value derived from the frozen parameter `name` by `make` (e.g. a weight repacked for
    /// a kernel), made once and kept until the store's values may have changed: loading
    /// weights, quantizing, freezing or unfreezing, a data-parallel broadcast, or
    /// [`Self::invalidate_derived`]. `None` for a trainable or unknown parameter, whose values
    /// the optimizer changes every step, and when `make` gives `None`.
    pub fn derived<T: Any + Send + Sync>(
        &self,
        name: &str,
        make: impl FnOnce(&Tensor) -> candle_core::Result<Option<T>>,
    ) -> candle_core::Result<Option<Arc<T>>> {
        let var = match self.lock().get(name) {
            Some(e) if !e.trainable => e.var.clone(),
            _ => return Ok(None),
        };
        let key = format!("{name}#{}", std::any::type_name::<T>());
        let mut map = self
            .inner
            .derived
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(&key).and_then(|v| v.clone().downcast::<T>().ok()) {
            return Ok(Some(v));
        }
        let Some(v) = make(var.as_tensor())? else {
            return Ok(None);
        };
        let v = Arc::new(v);
        map.insert(key, v.clone());
        Ok(Some(v))
    }

    /// Drops every value [`Self::derived`] kept: call it after changing a frozen parameter's
    /// values from outside the store.
    pub fn invalidate_derived(&self) {
        self.inner.derived.clear();
    }

    /// The int8 weights of parameter `name`, once the model is quantized.
    pub fn quantized(&self, name: &str) -> Option<Arc<QTensor>> {
        let q = self.inner.quant.read().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            return None;
        }
        q.get(name).cloned()
    }

    /// Whether any weight is quantized.
    pub fn is_quantized(&self) -> bool {
        !self
            .inner
            .quant
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Every int8 weight, by name.
    pub fn quantized_all(&self) -> BTreeMap<String, Arc<QTensor>> {
        self.inner
            .quant
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs int8 weights for parameter `q.name` (or a derived name, such as a stacked
    /// product of several parameters). A parameter's f32 value becomes the dequantized
    /// weights, so that any f32 path computes the same function.
    pub fn set_quantized(&self, q: Arc<QTensor>) -> Result<()> {
        if let Some(var) = self.get(&q.name) {
            if var.elem_count() != q.q.len() {
                return Err(Error::Checkpoint(format!(
                    "{}: {} int8 values for a parameter of shape {:?}",
                    q.name,
                    q.q.len(),
                    var.dims()
                )));
            }
            let t = Tensor::from_vec(q.dequantize(), var.shape(), var.device())?;
            var.set(&t)?;
            self.invalidate_derived();
        }
        if q.kind != crate::quant::LayerKind::Embedding {
            // Pack now, so that the first forward pass costs what the others do.
            q.packed();
        }
        self.inner
            .quant
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(q.name.clone(), q);
        Ok(())
    }

    /// Starts recording the inputs of quantizable layers ([`Self::observe`]).
    pub fn start_calibration(&self) {
        *self
            .inner
            .calibration
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Calibration::default();
        self.inner.calibrating.store(true, Ordering::SeqCst);
    }

    /// Stops recording and returns what was recorded.
    pub fn finish_calibration(&self) -> Calibration {
        self.inner.calibrating.store(false, Ordering::SeqCst);
        std::mem::take(
            &mut *self
                .inner
                .calibration
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Records `x`, the input of the quantizable layer whose weight is `name`, while
    /// calibrating (a no-op otherwise). Models call it on their f32 path.
    pub fn observe(&self, name: &str, x: &Tensor) -> candle_core::Result<()> {
        if !self.inner.calibrating.load(Ordering::Relaxed) {
            return Ok(());
        }
        let dims = x.dims().to_vec();
        let v: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        self.inner
            .calibration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(name, &v, &dims);
        Ok(())
    }

    /// Freezes (or unfreezes) every parameter whose name starts with `prefix`; returns how many.
    pub fn set_trainable(&self, prefix: &str, trainable: bool) -> usize {
        self.invalidate_derived();
        let mut n = 0;
        for (name, e) in self.lock().iter_mut() {
            if name.starts_with(prefix) && !e.buffer {
                e.trainable = trainable;
                n += 1;
            }
        }
        n
    }

    /// Whether `name` is a trainable parameter.
    pub fn is_trainable(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|e| e.trainable)
    }

    /// A non-trainable buffer `name` filled with `value` (or the existing one): saved in
    /// checkpoints and loaded from weight files like a parameter, but never trained.
    pub fn buffer(&self, name: &str, shape: impl Into<Shape>, value: f32) -> Result<Tensor> {
        let shape = shape.into();
        let mut vars = self.lock();
        if let Some(e) = vars.get(name) {
            return Ok(e.var.as_tensor().clone());
        }
        let t = Tensor::full(value, shape, &self.inner.device)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        vars.insert(
            name.to_string(),
            Entry {
                var,
                trainable: false,
                buffer: true,
            },
        );
        Ok(out)
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| !e.buffer)
            .map(|e| e.var.elem_count())
            .sum()
    }

    /// Serializes every parameter as safetensors (f32, names sorted). The bytes depend only on
    /// the values, so equal weights give byte-identical files.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut named = Vec::new();
        for p in self.params() {
            named.push((p.name, p.var.as_tensor().clone()));
        }
        tensors_to_safetensors(&named)
    }

    /// Loads weights saved by [`Self::to_safetensors`] (or by PyTorch with the same names).
    /// Missing, unexpected or mis-shaped names are all listed in one error.
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = read_safetensors(path, &bytes, &self.inner.device)?;
        self.load_map(&path.display().to_string(), &tensors, &|_| false)
    }

    /// Sets every parameter and buffer from `tensors` (named as in a PyTorch state dict),
    /// except those for which `skip` holds, on both sides (e.g. a new head). Nothing is changed
    /// unless every name and shape matches; otherwise one error lists the missing, unexpected
    /// and mis-shaped names. `origin` names the source in the error.
    pub fn load_map(
        &self,
        origin: &str,
        tensors: &BTreeMap<String, Tensor>,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        let vars = self.lock();
        let mut missing: Vec<&str> = vars
            .keys()
            .filter(|k| !skip(k) && !tensors.contains_key(*k))
            .map(String::as_str)
            .collect();
        let mut unexpected: Vec<&str> = tensors
            .keys()
            .filter(|k| !skip(k) && !vars.contains_key(*k))
            .map(String::as_str)
            .collect();
        let mut mismatched = Vec::new();
        for (name, e) in vars.iter().filter(|(k, _)| !skip(k)) {
            if let Some(t) = tensors.get(name) {
                if t.elem_count() != e.var.elem_count()
                    || (t.dims() != e.var.dims() && e.var.rank() > 0)
                {
                    mismatched.push(format!(
                        "{name} (file {:?}, model {:?})",
                        t.dims(),
                        e.var.dims()
                    ));
                }
            }
        }
        if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
            let (nm, nu) = (missing.len(), unexpected.len());
            missing.truncate(20);
            unexpected.truncate(20);
            let more = |n: usize, shown: usize| {
                if n > shown {
                    format!(" and {} more", n - shown)
                } else {
                    String::new()
                }
            };
            return Err(Error::Checkpoint(format!(
                "{origin}: weights do not match the model: missing [{}]{}, unexpected [{}]{}, wrong shape [{}]; was it saved from a different config or architecture?",
                missing.join(", "),
                more(nm, missing.len()),
                unexpected.join(", "),
                more(nu, unexpected.len()),
                mismatched.join(", ")
            )));
        }
        self.invalidate_derived();
        for (name, e) in vars.iter().filter(|(k, _)| !skip(k)) {
            let t = tensors[name].to_dtype(DType::F32)?.reshape(e.var.shape())?;
            e.var.set(&t.to_device(e.var.device())?)?;
        }
        Ok(())
    }
}

/// Serializes named f32 tensors to safetensors bytes with `{"format": "pt"}` metadata, so that
/// `safetensors.torch.load_file` reads them.
pub fn tensors_to_safetensors(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (name, t) in named {
        let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .expect("shape matches byte length"),
            )
        })
        .collect();
    // One metadata key only: safetensors keeps metadata in a HashMap, whose order is random.
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Checkpoint(format!("cannot serialize tensors: {e}")))
}

/// Parses safetensors bytes into named tensors; errors name the file.
pub fn read_safetensors(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Error::Checkpoint(format!(
            "{}: not a valid safetensors file ({e}); the checkpoint is corrupt or truncated",
            path.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::U8 => DType::U8,
            other => {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor `{name}` has unsupported dtype {other:?}",
                    path.display()
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?;
        out.insert(name, t);
    }
    Ok(out)
}

fn init_values(seed: u64, name: &str, shape: &Shape, init: Init) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = Rng::keyed(seed, name, 0);
    let uniform = |rng: &mut Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (up - lo) * rng.next_f64()) as f32)
            .collect()
    };
    let normal = |rng: &mut Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n).map(|_| (mean + std * rng.normal()) as f32).collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan_for(fan, shape);
            let std = gain(non_linearity) / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            }
        }
    }
}

fn fan_for(fan: FanInOut, shape: &Shape) -> usize {
    fan.for_shape(shape).max(1)
}

fn gain(nl: NonLinearity) -> f64 {
    nl.gain()
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.lock();
        if let Some(e) = vars.get(name) {
            if e.var.shape() != &s {
                candle_core::bail!(
                    "parameter `{name}` requested with shape {s:?} but exists with {:?}",
                    e.var.shape()
                );
            }
            return e.var.as_tensor().to_dtype(dtype);
        }
        let values = init_values(self.inner.seed, name, &s, h);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        vars.insert(
            name.to_string(),
            Entry {
                var,
                trainable: true,
                buffer: false,
            },
        );
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.lock().get(name) {
            Some(e) => e.var.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("no parameter named `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn derived_values_are_kept_for_frozen_parameters_until_the_values_change() {
        let store = ParamStore::new(0);
        let vb = store.var_builder();
        vb.get((2, 3), "a.weight").unwrap();
        vb.get(4, "b.weight").unwrap();
        store.set_trainable("a.", false);
        let made = AtomicUsize::new(0);
        let sum = |t: &Tensor| {
            made.fetch_add(1, Ordering::Relaxed);
            Ok(Some(t.sum_all()?.to_scalar::<f32>()?))
        };
        let first = store.derived("a.weight", sum).unwrap().unwrap();
        let again = store.derived("a.weight", sum).unwrap().unwrap();
        assert_eq!((*first, made.load(Ordering::Relaxed)), (*again, 1));
        // A trainable parameter changes every step: nothing is kept, nothing made.
        assert!(store.derived("b.weight", sum).unwrap().is_none());
        assert!(store.derived("missing", sum).unwrap().is_none());
        assert_eq!(made.load(Ordering::Relaxed), 1);
        // Loading new values drops what was derived from the old ones.
        let ones = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let map = BTreeMap::from([("a.weight".to_string(), ones)]);
        store.load_map("test", &map, &|n| n != "a.weight").unwrap();
        let loaded = store.derived("a.weight", sum).unwrap().unwrap();
        assert_eq!((*loaded, made.load(Ordering::Relaxed)), (6.0, 2));
        store.invalidate_derived();
        store.derived("a.weight", sum).unwrap();
        assert_eq!(made.load(Ordering::Relaxed), 3);
    }
}
