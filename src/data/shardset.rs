//! Reading shards: memory-mapped, random access by global sample index, every file checked
//! against the manifest before use.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::shard::{checksum, Dtype, Manifest};
use crate::{Error, Result};

/// Where one field's bytes sit inside a shard's memory map.
#[derive(Debug, Clone)]
struct FieldLoc {
    data: Range<usize>,
    /// Variable-length fields: the i64 offsets (`samples + 1` of them), decoded.
    offsets: Option<Vec<i64>>,
}

#[derive(Debug)]
struct OpenShard {
    path: PathBuf,
    map: Mmap,
    samples: u64,
    fields: Vec<FieldLoc>,
}

/// An opened shard directory.
#[derive(Debug)]
pub struct ShardSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
    shards: Vec<OpenShard>,
    /// Global index of the first sample of each shard, plus the total at the end.
    starts: Vec<u64>,
}

fn shard_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!(
        "{}: {msg}; the shard is corrupt — re-run `wick data pack`",
        path.display()
    ))
}

fn dtype_of(d: safetensors::Dtype) -> Option<Dtype> {
    match d {
        safetensors::Dtype::U8 => Some(Dtype::U8),
        safetensors::Dtype::U32 => Some(Dtype::U32),
        safetensors::Dtype::I64 => Some(Dtype::I64),
        safetensors::Dtype::F32 => Some(Dtype::F32),
        _ => None,
    }
}

impl ShardSet {
    /// Opens `dir`: reads the manifest, maps every shard and checks its size, header, fields,
    /// dtypes and shapes against the manifest; with `verify_checksums`, also hashes every
    /// shard (in parallel).
    pub fn open(dir: &Path, verify_checksums: bool) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let shards: Vec<OpenShard> = manifest
            .shards
            .par_iter()
            .map(|info| open_shard(dir, &manifest, info, verify_checksums))
            .collect::<Result<_>>()?;
        let mut starts = Vec::with_capacity(shards.len() + 1);
        let mut acc = 0u64;
        for s in &shards {
            starts.push(acc);
            acc += s.samples;
        }
        starts.push(acc);
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            starts,
        })
    }

    /// Hashes every shard and compares with the manifest.
    pub fn verify_checksums(&self) -> Result<()> {
        self.shards
            .par_iter()
            .zip(&self.manifest.shards)
            .try_for_each(|(s, info)| check_sum(&s.path, &s.map, &info.xxh3))
    }

    pub fn len(&self) -> usize {
        *self.starts.last().unwrap_or(&0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The global index range of each shard.
    pub fn blocks(&self) -> Vec<Range<usize>> {
        self.starts
            .windows(2)
            .map(|w| w[0] as usize..w[1] as usize)
            .collect()
    }

    /// Index of field `name`.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.manifest.fields.iter().position(|f| f.name == name)
    }

    fn locate(&self, i: usize) -> (usize, usize) {
        let i = i as u64;
        let s = self.starts.partition_point(|&st| st <= i) - 1;
        (s, (i - self.starts[s]) as usize)
    }

    /// Raw little-endian bytes of sample `i` of field number `f` (fixed or variable).
    pub fn bytes(&self, f: usize, i: usize) -> &[u8] {
        let (s, local) = self.locate(i);
        let sh = &self.shards[s];
        let field = &self.manifest.fields[f];
        let loc = &sh.fields[f];
        let size = field.dtype.size();
        let (a, b) = match (&loc.offsets, field.numel()) {
            (Some(off), _) => (off[local] as usize * size, off[local + 1] as usize * size),
            (None, Some(numel)) => (local * numel * size, (local + 1) * numel * size),
            (None, None) => unreachable!("variable fields have offsets"),
        };
        &sh.map[loc.data.start + a..loc.data.start + b]
    }

    /// The class index of sample `i` from an integer label field.
    pub fn label(&self, f: usize, i: usize) -> i64 {
        let b = self.bytes(f, i);
        match self.manifest.fields[f].dtype {
            Dtype::U8 => b[0] as i64,
            Dtype::U32 => u32::from_le_bytes(b[..4].try_into().unwrap()) as i64,
            Dtype::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()),
            Dtype::F32 => f32::from_le_bytes(b[..4].try_into().unwrap()) as i64,
        }
    }
}

fn check_sum(path: &Path, bytes: &[u8], want: &str) -> Result<()> {
    let got = checksum(bytes);
    if got != want {
        return Err(shard_err(
            path,
            format!("checksum mismatch (xxh3 {got}, manifest says {want}): the file's contents changed after packing"),
        ));
    }
    Ok(())
}

fn open_shard(
    dir: &Path,
    m: &Manifest,
    info: &super::shard::ShardInfo,
    verify: bool,
) -> Result<OpenShard> {
    let path = dir.join(&info.file);
    let file = File::open(&path).map_err(|e| {
        Error::Data(format!(
            "{}: cannot open a shard listed in the manifest ({e}); the dataset is incomplete — re-run `wick data pack`",
            path.display()
        ))
    })?;
    let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    if len != info.bytes {
        let what = if len < info.bytes {
            "truncated"
        } else {
            "longer than packed"
        };
        return Err(shard_err(
            &path,
            format!("{len} bytes, but the manifest says {} ({what})", info.bytes),
        ));
    }
    // SAFETY: the map is read-only. As with any memory map, another process truncating or
    // rewriting the file while it is mapped is undefined behaviour; shards are written once.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    if verify {
        check_sum(&path, &map, &info.xxh3)?;
    }
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| shard_err(&path, format!("unreadable safetensors header ({e})")))?;
    let base = map.as_ptr() as usize;
    let n = info.samples as usize;
    let mut fields = Vec::with_capacity(m.fields.len());
    for f in &m.fields {
        let get = |name: &str| {
            st.tensor(name).map_err(|_| {
                shard_err(
                    &path,
                    format!("missing tensor `{name}` for field `{}`", f.name),
                )
            })
        };
        let check_dtype =
            |name: &str, t: &safetensors::tensor::TensorView<'_>, want: Dtype| match dtype_of(
                t.dtype(),
            ) {
                Some(d) if d == want => Ok(()),
                _ => Err(shard_err(
                    &path,
                    format!(
                        "tensor `{name}` is {:?}, but the manifest says field `{}` is {:?}",
                        t.dtype(),
                        f.name,
                        want
                    ),
                )),
            };
        let range = |t: &safetensors::tensor::TensorView<'_>| {
            let start = t.data().as_ptr() as usize - base;
            start..start + t.data().len()
        };
        match &f.shape {
            Some(shape) => {
                let t = get(&f.name)?;
                check_dtype(&f.name, &t, f.dtype)?;
                let mut want = vec![n];
                want.extend(shape);
                if t.shape() != want.as_slice() {
                    return Err(shard_err(
                        &path,
                        format!(
                            "tensor `{}` has shape {:?}, the manifest implies {want:?}",
                            f.name,
                            t.shape()
                        ),
                    ));
                }
                fields.push(FieldLoc {
                    data: range(&t),
                    offsets: None,
                });
            }
            None => {
                let dname = format!("{}.data", f.name);
                let oname = format!("{}.offsets", f.name);
                let d = get(&dname)?;
                check_dtype(&dname, &d, f.dtype)?;
                let o = get(&oname)?;
                check_dtype(&oname, &o, Dtype::I64)?;
                if o.shape() != [n + 1] {
                    return Err(shard_err(
                        &path,
                        format!("`{oname}` has shape {:?}, expected [{}]", o.shape(), n + 1),
                    ));
                }
                let offsets: Vec<i64> = o
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let data_len = d.shape().first().copied().unwrap_or(0) as i64;
                let ok = offsets.first() == Some(&0)
                    && offsets.windows(2).all(|w| w[0] <= w[1])
                    && offsets.last() == Some(&data_len);
                if !ok {
                    return Err(shard_err(
                        &path,
                        format!("`{oname}` is not a valid offset table for `{dname}`"),
                    ));
                }
                fields.push(FieldLoc {
                    data: range(&d),
                    offsets: Some(offsets),
                });
            }
        }
    }
    drop(st);
    Ok(OpenShard {
        path,
        map,
        samples: info.samples,
        fields,
    })
}
