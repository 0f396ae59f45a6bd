//! The shard format: a directory with `manifest.json` and `shard-NNNNN.safetensors` files.
//!
//! - A *fixed-shape* field `f` is stored in each shard as the tensor `f` of shape `[N, ...]`.
//! - A *variable-length* field `f` (encoded image bytes, token ids, raw UTF-8 text) is stored as
//!   flat data `f.data` plus `f.offsets` (`[N + 1]`, i64): sample `i` is
//!   `f.data[offsets[i]..offsets[i + 1]]`.
//!
//! Every shard is a plain safetensors file, so `safetensors.numpy.load_file` reads it. The
//! manifest records the fields, per-shard sample counts, byte sizes and xxh3-64 checksums, class
//! names, and preprocessing statistics.

use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::write_atomic;
use crate::{Error, Result};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "wick-shards";
pub const VERSION: u32 = 1;
/// Default target size of one shard.
pub const DEFAULT_SHARD_BYTES: u64 = 64 << 20;

/// Element types a field can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U8,
    U32,
    I64,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 => 8,
        }
    }

    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::U8 => safetensors::Dtype::U8,
            Dtype::U32 => safetensors::Dtype::U32,
            Dtype::I64 => safetensors::Dtype::I64,
            Dtype::F32 => safetensors::Dtype::F32,
        }
    }
}

/// One field of every sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub dtype: Dtype,
    /// Per-sample shape; `None` for variable length.
    pub shape: Option<Vec<usize>>,
    /// What the bytes mean: `"tensor"`, `"image"` (encoded JPEG/PNG), `"text"` (UTF-8), `"label"`.
    #[serde(default = "default_kind")]
    pub kind: String,
}

fn default_kind() -> String {
    "tensor".into()
}

impl Field {
    pub fn fixed(name: &str, dtype: Dtype, shape: &[usize], kind: &str) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: Some(shape.to_vec()),
            kind: kind.into(),
        }
    }

    pub fn variable(name: &str, dtype: Dtype, kind: &str) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: None,
            kind: kind.into(),
        }
    }

    /// Elements per sample of a fixed-shape field.
    pub fn numel(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.iter().product())
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub samples: u64,
    pub bytes: u64,
    /// xxh3-64 of the whole file, 16 hex digits.
    pub xxh3: String,
}

/// Per-feature statistics of a field, computed when packing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub num_samples: u64,
    pub fields: Vec<Field>,
    pub shards: Vec<ShardInfo>,
    /// Name of the label field, if any.
    pub label: Option<String>,
    /// Class names in label order.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Names of the columns of a tabular `features` field.
    #[serde(default)]
    pub feature_names: Vec<String>,
    /// Categorical feature columns: the feature value is the index into this vocabulary.
    #[serde(default)]
    pub categories: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub stats: BTreeMap<String, Stats>,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub created_by: String,
}

impl Manifest {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Reads and checks `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(|e| {
            Error::Data(format!(
                "{}: cannot read the shard manifest ({e}); is {} a directory made by `wick data pack`?",
                path.display(),
                dir.display()
            ))
        })?;
        Self::parse(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
    }

    /// Parses and validates manifest text; the error says what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let m: Manifest = serde_json::from_str(text)
            .map_err(|e| format!("invalid manifest JSON: {e}; re-run `wick data pack`"))?;
        if m.format != FORMAT {
            return Err(format!("format is \"{}\", expected \"{FORMAT}\"", m.format));
        }
        if m.version != VERSION {
            return Err(format!(
                "format version {} is not supported (this wick reads version {VERSION})",
                m.version
            ));
        }
        if m.fields.is_empty() {
            return Err("the manifest lists no fields".into());
        }
        let mut names: Vec<&str> = m.fields.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("field `{}` is listed twice", w[0]));
        }
        for f in &m.fields {
            if f.name.is_empty() || f.name.contains('.') {
                return Err(format!("field name `{}` is empty or contains '.'", f.name));
            }
            if let Some(s) = &f.shape {
                if s.contains(&0) {
                    return Err(format!("field `{}` has a zero dimension in {s:?}", f.name));
                }
                if s.iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .is_none()
                {
                    return Err(format!("field `{}` shape {s:?} overflows", f.name));
                }
            }
        }
        if let Some(l) = &m.label {
            if m.field(l).is_none() {
                return Err(format!("label field `{l}` is not among the fields"));
            }
        }
        let total: u64 = m
            .shards
            .iter()
            .try_fold(0u64, |a, s| a.checked_add(s.samples))
            .ok_or("shard sample counts overflow")?;
        if total != m.num_samples {
            return Err(format!(
                "num_samples is {} but the shards hold {total}",
                m.num_samples
            ));
        }
        let mut files = std::collections::BTreeSet::new();
        for s in &m.shards {
            if s.file.is_empty()
                || s.file.contains('/')
                || s.file.contains('\\')
                || s.file.starts_with('.')
            {
                return Err(format!(
                    "shard file name `{}` is not a plain file name",
                    s.file
                ));
            }
            if !files.insert(s.file.as_str()) {
                return Err(format!(
                    "shard `{}` is listed twice (its samples would be read twice); re-run `wick data pack`",
                    s.file
                ));
            }
        }
        for (name, st) in &m.stats {
            let f = m.field(name).ok_or_else(|| {
                format!(
                    "stats are given for `{name}`, which is not a field; re-run `wick data pack`"
                )
            })?;
            let n = st.mean.len();
            if st.std.len() != n || n == 0 || f.numel().is_some_and(|d| n != 1 && n != d) {
                return Err(format!(
                    "stats of `{name}` have {n} means and {} standard deviations; expected as many of each, 1 or one per feature{}; re-run `wick data pack`",
                    st.std.len(),
                    f.numel().map(|d| format!(" ({d})")).unwrap_or_default()
                ));
            }
            if st.mean.iter().chain(&st.std).any(|v| !v.is_finite())
                || st.std.iter().any(|&v| v < 0.0)
            {
                return Err(format!(
                    "stats of `{name}` hold a value that is not finite, or a negative standard deviation; re-run `wick data pack`"
                ));
            }
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("manifest serializes");
        write_atomic(&dir.join(MANIFEST), json.as_bytes())
    }
}

/// xxh3-64 of `bytes` as 16 hex digits.
pub fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// A field's values for a run of samples, ready to be written into a shard.
#[derive(Debug, Clone)]
pub enum Column {
    /// Fixed shape: `samples × numel` elements, little-endian bytes.
    Fixed(Vec<u8>),
    /// Variable length: concatenated data bytes and `samples + 1` element offsets.
    Var { data: Vec<u8>, offsets: Vec<i64> },
}

/// Splits `n` samples into consecutive shards of about `target_bytes`, given each sample's
/// size in bytes.
pub fn plan_shards(sizes: impl Iterator<Item = u64>, target_bytes: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut acc, mut i) = (0usize, 0u64, 0usize);
    for sz in sizes {
        acc += sz;
        i += 1;
        if acc >= target_bytes.max(1) {
            out.push(start..i);
            start = i;
            acc = 0;
        }
    }
    if start < i {
        out.push(start..i);
    }
    out
}

/// Serializes one shard's columns (in field order) as safetensors bytes.
pub fn shard_bytes(fields: &[Field], n: usize, cols: Vec<Column>) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (f, col) in fields.iter().zip(cols) {
        match col {
            Column::Fixed(buf) => {
                let mut shape = vec![n];
                shape.extend(f.shape.as_ref().expect("fixed field"));
                owned.push((f.name.clone(), f.dtype.safetensors(), shape, buf));
            }
            Column::Var { data, offsets } => {
                let len = data.len() / f.dtype.size();
                owned.push((
                    format!("{}.data", f.name),
                    f.dtype.safetensors(),
                    vec![len],
                    data,
                ));
                let ob: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
                owned.push((
                    format!("{}.offsets", f.name),
                    safetensors::Dtype::I64,
                    vec![offsets.len()],
                    ob,
                ));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(name, dt, shape, b)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Data(format!("field `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, None)
        .map_err(|e| Error::Data(format!("cannot serialize a shard: {e}")))
}

/// Writes shards in parallel: `build(range)` returns the columns of samples `range`; each
/// shard is serialized, hashed and written atomically by a rayon worker. `progress(done, total)`
/// is called with the samples written so far as shards complete (for progress bars).
pub fn write_shards(
    dir: &Path,
    fields: &[Field],
    ranges: &[Range<usize>],
    build: impl Fn(Range<usize>) -> Result<Vec<Column>> + Sync,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<ShardInfo>> {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if dir.join(MANIFEST).exists() {
        return Err(Error::Data(format!(
            "{}: already holds a packed dataset; remove it or choose another --out",
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let total = ranges.last().map(|r| r.end).unwrap_or(0);
    let done = AtomicUsize::new(0);
    ranges
        .par_iter()
        .enumerate()
        .map(|(k, r)| {
            let cols = build(r.clone())?;
            let bytes = shard_bytes(fields, r.len(), cols)?;
            let file = format!("shard-{k:05}.safetensors");
            write_atomic(&dir.join(&file), &bytes)?;
            progress(done.fetch_add(r.len(), Ordering::Relaxed) + r.len(), total);
            Ok(ShardInfo {
                file,
                samples: r.len() as u64,
                bytes: bytes.len() as u64,
                xxh3: checksum(&bytes),
            })
        })
        .collect()
}

impl Manifest {
    /// A manifest for `fields` and written `shards`; the caller fills in labels and stats.
    pub fn new(fields: Vec<Field>, shards: Vec<ShardInfo>, source: &str) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            num_samples: shards.iter().map(|s| s.samples).sum(),
            fields,
            shards,
            label: None,
            classes: Vec::new(),
            feature_names: Vec::new(),
            categories: BTreeMap::new(),
            stats: BTreeMap::new(),
            source: source.into(),
            created_by: format!("wick {}", crate::VERSION),
        }
    }
}
