//! Synthetic shard datasets for benchmarks and tests: `x` (f32 `[dim]`) and `label` (i64),
//! with values drawn from a seeded generator.

use std::path::Path;

use super::shard::{plan_shards, write_shards, Column, Dtype, Field, Manifest, MANIFEST};
use crate::rng::Rng;
use crate::Result;

/// Writes `n` samples of `dim` f32 features and a label in `0..classes` to `dir`, in shards of
/// about `shard_bytes`, unless `dir` already holds exactly that dataset. Returns the manifest.
pub fn ensure(
    dir: &Path,
    n: usize,
    dim: usize,
    classes: usize,
    shard_bytes: u64,
) -> Result<Manifest> {
    if dir.join(MANIFEST).is_file() {
        if let Ok(m) = Manifest::read(dir) {
            let same = m.num_samples == n as u64
                && m.field("x").and_then(|f| f.numel()) == Some(dim)
                && m.classes.len() == classes;
            if same {
                return Ok(m);
            }
        }
        std::fs::remove_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    let fields = vec![
        Field::fixed("x", Dtype::F32, &[dim], "tensor"),
        Field::fixed("label", Dtype::I64, &[], "label"),
    ];
    let ranges = plan_shards(std::iter::repeat_n((dim * 4 + 8) as u64, n), shard_bytes);
    let shards = write_shards(
        dir,
        &fields,
        &ranges,
        |r| {
            let mut x = Vec::with_capacity(r.len() * dim * 4);
            let mut y = Vec::with_capacity(r.len() * 8);
            for i in r {
                let mut rng = Rng::keyed(0, "synthetic", i as u64);
                for _ in 0..dim {
                    x.extend_from_slice(&(rng.next_f32() * 2.0 - 1.0).to_le_bytes());
                }
                y.extend_from_slice(&(rng.below(classes as u64) as i64).to_le_bytes());
            }
            Ok(vec![Column::Fixed(x), Column::Fixed(y)])
        },
        &|_, _| (),
    )?;
    let mut m = Manifest::new(fields, shards, "synthetic");
    m.label = Some("label".into());
    m.classes = (0..classes).map(|c| c.to_string()).collect();
    m.write(dir)?;
    Ok(m)
}
