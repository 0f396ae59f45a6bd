//! The quantized checkpoint: one safetensors file holding, for each int8 weight `NAME`, an I8
//! tensor `NAME` (the f32 weight's shape) and an F32 tensor `NAME.qscale` (one scale per
//! output channel), plus `NAME.act_scale` in static mode; every other parameter stays F32
//! under its own name. The metadata names the scheme and carries a checksum of every tensor,
//! so that a damaged file is refused rather than run.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{LayerKind, QTensor, QuantMode};
use crate::model::Model;
use crate::{Error, Result};

/// The quantized weights in a quantized run directory.
pub const MODEL_FILE: &str = "model.int8.safetensors";
/// The f32 against int8 report `wick quantize` writes beside it.
pub const REPORT_FILE: &str = "quantize.json";

const FORMAT: &str = "wick-int8";
const SCHEME: &str = "weights: symmetric int8 per output channel (q in [-127, 127], scale = max|w|/127); activations: symmetric int8 per row";

/// What the metadata of a quantized checkpoint says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantMeta {
    pub format: String,
    pub scheme: String,
    pub mode: QuantMode,
    /// The model kind it was made from.
    pub model: String,
    pub layers: usize,
}

fn checksum<D: AsRef<[u8]>>(named: &[(String, safetensors::Dtype, Vec<usize>, D)]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, _, shape, data) in named {
        h.update(name.as_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(data.as_ref());
    }
    format!("{:016x}", h.digest())
}

/// Writes `model`'s weights (int8 where quantized) to `path`, atomically.
pub fn save(model: &dyn Model, mode: QuantMode, path: &Path) -> Result<QuantMeta> {
    let store = model.store();
    let quant = store.quantized_all();
    let mut named: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for p in store.params() {
        match quant.get(&p.name) {
            Some(q) => {
                named.push((
                    p.name.clone(),
                    safetensors::Dtype::I8,
                    q.shape.clone(),
                    q.q.iter().map(|&v| v as u8).collect(),
                ));
                named.push((
                    format!("{}.qscale", p.name),
                    safetensors::Dtype::F32,
                    vec![q.scale.len()],
                    f32_bytes(&q.scale),
                ));
                if let Some(a) = q.act_scale {
                    named.push((
                        format!("{}.act_scale", p.name),
                        safetensors::Dtype::F32,
                        vec![1],
                        f32_bytes(&[a]),
                    ));
                }
            }
            None => {
                let v: Vec<f32> = p.var.as_tensor().flatten_all()?.to_vec1()?;
                named.push((
                    p.name.clone(),
                    safetensors::Dtype::F32,
                    p.var.dims().to_vec(),
                    f32_bytes(&v),
                ));
            }
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = QuantMeta {
        format: FORMAT.into(),
        scheme: SCHEME.into(),
        mode,
        model: model.kind().to_string(),
        layers: quant.keys().filter(|k| store.get(k).is_some()).count(),
    };
    let mut md = std::collections::HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert(
        "wick.quant".to_string(),
        serde_json::to_string(&meta).expect("plain data"),
    );
    md.insert("wick.xxh3".to_string(), checksum(&named));
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = named
        .iter()
        .map(|(n, dt, shape, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
                    .expect("shape matches data"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(md))
        .map_err(|e| Error::Checkpoint(format!("{}: cannot serialize: {e}", path.display())))?;
    crate::io::write_atomic(path, &bytes)?;
    Ok(meta)
}

/// The tensor shapes of a quantized checkpoint, by name (read from its header only).
pub fn file_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::Checkpoint(format!(
            "{}: not a readable safetensors file ({e}); it is damaged or truncated: quantize the run again with `wick quantize RUN_DIR`",
            path.display()
        ))
    })?;
    Ok(header
        .tensors()
        .into_iter()
        .map(|(n, info)| (n, info.shape.clone()))
        .collect())
}

/// Loads a quantized checkpoint written by [`save`] into `model` (built from the same run
/// config): f32 parameters are set, int8 weights installed. Damaged files, files of another
/// model and mismatched names or shapes are refused with an error saying what is wrong.
pub fn load(model: &dyn Model, path: &Path) -> Result<QuantMeta> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let again = "quantize the run again with `wick quantize RUN_DIR`";
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::Checkpoint(format!(
            "{shown}: not a readable safetensors file ({e}); it is damaged or truncated: {again}"
        ))
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::Checkpoint(format!(
            "{shown}: not a readable safetensors file ({e}); it is damaged or truncated: {again}"
        ))
    })?;
    let md = header.metadata().clone().unwrap_or_default();
    let meta: QuantMeta = match (md.get("format"), md.get("wick.quant")) {
        (Some(f), Some(m)) if f == FORMAT => serde_json::from_str(m).map_err(|e| {
            Error::Checkpoint(format!("{shown}: unreadable quantization metadata ({e}): {again}"))
        })?,
        _ => {
            return Err(Error::Checkpoint(format!(
                "{shown}: not a wick int8 checkpoint (no `{FORMAT}` metadata); pass a directory written by `wick quantize`"
            )))
        }
    };
    if meta.model != model.kind() {
        return Err(Error::Checkpoint(format!(
            "{shown}: quantized from a `{}` model, but the run config builds a `{}`; use the config the checkpoint was made with",
            meta.model,
            model.kind()
        )));
    }
    let mut named = Vec::new();
    for (name, view) in st.tensors() {
        named.push((name, view.dtype(), view.shape().to_vec(), view.data()));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if md.get("wick.xxh3") != Some(&checksum(&named)) {
        return Err(Error::Checkpoint(format!(
            "{shown}: checksum mismatch: the file was changed or damaged after it was written; {again}"
        )));
    }
    let tensors: BTreeMap<String, (safetensors::Dtype, Vec<usize>, &[u8])> = named
        .into_iter()
        .map(|(n, d, s, b)| (n, (d, s, b)))
        .collect();
    let layers: BTreeMap<String, LayerKind> = model
        .quant_layers()
        .into_iter()
        .map(|l| (l.name, l.kind))
        .collect();
    let store = model.store();
    let device = store.device().clone();
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut plain = BTreeMap::new();
    let mut quant = Vec::new();
    let mut problems = Vec::new();
    for p in store.params() {
        let want = p.var.dims().to_vec();
        let Some((dtype, shape, data)) = tensors.get(&p.name) else {
            problems.push(format!("missing `{}`", p.name));
            continue;
        };
        if shape != &want {
            problems.push(format!(
                "`{}` has shape {shape:?}, the model {want:?}",
                p.name
            ));
            continue;
        }
        match dtype {
            safetensors::Dtype::F32 => {
                plain.insert(
                    p.name.clone(),
                    candle_core::Tensor::from_vec(f32s(data), want.clone(), &device)?,
                );
            }
            safetensors::Dtype::I8 => {
                let Some(&kind) = layers.get(&p.name) else {
                    problems.push(format!(
                        "`{}` is int8 but is not a quantizable layer",
                        p.name
                    ));
                    continue;
                };
                let scale = match tensors.get(&format!("{}.qscale", p.name)) {
                    Some((safetensors::Dtype::F32, s, b)) if s == &[want[0]] => f32s(b),
                    _ => {
                        problems.push(format!(
                            "`{}.qscale` is missing or is not {} f32 scales",
                            p.name, want[0]
                        ));
                        continue;
                    }
                };
                if scale.iter().any(|s| !s.is_finite() || *s < 0.0) {
                    problems.push(format!(
                        "`{}.qscale` holds a negative or non-finite scale",
                        p.name
                    ));
                    continue;
                }
                let act = match tensors.get(&format!("{}.act_scale", p.name)) {
                    Some((safetensors::Dtype::F32, _, b)) if b.len() == 4 => {
                        let a = f32s(b)[0];
                        if !(a.is_finite() && a > 0.0) {
                            problems.push(format!("`{}.act_scale` is {a}", p.name));
                            continue;
                        }
                        Some(a)
                    }
                    Some(_) => {
                        problems.push(format!("`{}.act_scale` is not one f32", p.name));
                        continue;
                    }
                    None => None,
                };
                if meta.mode == QuantMode::Static && kind != LayerKind::Embedding && act.is_none() {
                    problems.push(format!("static checkpoint without `{}.act_scale`", p.name));
                    continue;
                }
                let q: Vec<i8> = data.iter().map(|&b| b as i8).collect();
                quant.push(QTensor::from_parts(
                    &p.name,
                    kind,
                    want.clone(),
                    q,
                    scale,
                    act,
                ));
            }
            other => problems.push(format!(
                "`{}` has dtype {other:?}; expected F32 or I8",
                p.name
            )),
        }
    }
    let params: std::collections::BTreeSet<String> =
        store.params().into_iter().map(|p| p.name).collect();
    for name in tensors.keys() {
        let base = name
            .strip_suffix(".qscale")
            .or_else(|| name.strip_suffix(".act_scale"))
            .unwrap_or(name);
        if !params.contains(base) {
            problems.push(format!("unexpected `{name}`"));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(10);
        return Err(Error::Checkpoint(format!(
            "{shown}: the quantized weights do not match the model ({n} problems: {}); was it made from a different run config?",
            problems.join("; ")
        )));
    }
    store.load_map(&shown.to_string(), &plain, &|n| !plain.contains_key(n))?;
    for q in quant {
        store.set_quantized(Arc::new(q))?;
    }
    Ok(meta)
}
