//! `wick data pack | inspect | verify`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::data::pack::{pack_csv, pack_idx};
use crate::data::shard::Dtype;
use crate::data::ShardSet;

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Pack source files into a shard directory.
    Pack(PackArgs),
    /// Print a shard directory's schema, counts, class balance and per-class statistics.
    Inspect {
        /// A shard directory.
        dir: PathBuf,
    },
    /// Check every shard's size, header, fields, shapes and checksum.
    Verify {
        /// A shard directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct PackArgs {
    #[command(subcommand)]
    pub from: PackFrom,
    /// Output directory (must not hold a dataset yet).
    #[arg(long, global = true, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Target shard size, e.g. 64MiB, 512KiB, 1000000.
    #[arg(long, global = true, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub shard_size: u64,
}

#[derive(Debug, Subcommand)]
pub enum PackFrom {
    /// IDX image + label files (MNIST, Fashion-MNIST), gzipped or not.
    Idx {
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        labels: PathBuf,
        /// Comma-separated class names in label order.
        #[arg(long, value_delimiter = ',')]
        class_names: Option<Vec<String>>,
    },
    /// A folder with one subfolder per class holding .jpg/.jpeg/.png files.
    Images {
        root: PathBuf,
        /// Decode and resize to HxW now (stored as u8 [H, W, C]) instead of storing the
        /// encoded files.
        #[arg(long, value_name = "HxW", value_parser = parse_hw)]
        decode: Option<[usize; 2]>,
        /// With --decode: store one grayscale channel instead of RGB.
        #[arg(long)]
        grayscale: bool,
    },
    /// Text with labels: a CSV with `text` and `label` columns, or JSON lines with those keys.
    Text {
        input: PathBuf,
        #[arg(long, default_value = "text")]
        text_key: String,
        #[arg(long, default_value = "label")]
        label_key: String,
    },
    /// A CSV table with a header row: numeric and categorical columns plus a label column.
    Csv {
        input: PathBuf,
        #[arg(long, default_value = "target")]
        label: String,
        /// The label is a number to regress on rather than a class.
        #[arg(long)]
        regression: bool,
    },
}

/// Parses `HxW`, e.g. `64x64`.
fn parse_hw(s: &str) -> Result<[usize; 2], String> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}`: expected HxW, e.g. 64x64"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&v| v > 0 && v <= 8192)
    };
    match (p(h), p(w)) {
        (Some(h), Some(w)) => Ok([h, w]),
        _ => Err(format!("`{s}`: expected HxW with sides from 1 to 8192")),
    }
}

/// Parses `64MiB`, `512KiB`, `10MB`, `1GiB` or a plain byte count.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. 64MiB or 1000000"))?;
    let mul = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" | "k" => 1024.0,
        "mb" => 1e6,
        "mib" | "m" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("unknown size unit `{unit}`; use KiB, MiB or GiB")),
    };
    let v = n * mul;
    if v.is_nan() || v < 1.0 {
        return Err("the shard size must be at least 1 byte".into());
    }
    Ok(v as u64)
}

fn progress_bar(label: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30.cyan/blue}} {{pos}}/{{len}} samples [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .expect("valid template"),
    );
    Some(bar)
}

pub fn run(a: DataArgs) -> anyhow::Result<()> {
    match a.command {
        DataCommand::Pack(p) => pack(p),
        DataCommand::Inspect { dir } => inspect(dir),
        DataCommand::Verify { dir } => verify(dir),
    }
}

fn pack(p: PackArgs) -> anyhow::Result<()> {
    let out = p
        .out
        .ok_or_else(|| anyhow::anyhow!("--out DIR is required: where to write the shards"))?;
    let bar = progress_bar("packing");
    let progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let t0 = std::time::Instant::now();
    let m = match p.from {
        PackFrom::Idx {
            images,
            labels,
            class_names,
        } => pack_idx(&images, &labels, &out, class_names, p.shard_size, &progress)?,
        PackFrom::Csv {
            input,
            label,
            regression,
        } => pack_csv(&input, &label, regression, &out, p.shard_size, &progress)?,
        PackFrom::Images {
            root,
            decode,
            grayscale,
        } => crate::data::image::pack_image_folder(
            &root,
            &out,
            decode.map(|hw| (hw, if grayscale { 1 } else { 3 })),
            p.shard_size,
            &progress,
        )?,
        PackFrom::Text {
            input,
            text_key,
            label_key,
        } => crate::data::pack::pack_text(
            &input,
            &text_key,
            &label_key,
            &out,
            p.shard_size,
            &progress,
        )?,
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    eprintln!(
        "packed {} samples into {} shard(s), {:.1} MiB, in {:.2}s",
        m.num_samples,
        m.shards.len(),
        bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    println!("{}", out.display());
    Ok(())
}

fn verify(dir: PathBuf) -> anyhow::Result<()> {
    let set = ShardSet::open(&dir, true)?;
    println!(
        "ok: {} samples in {} shard(s); sizes, headers, fields, shapes and checksums match {}",
        set.len(),
        set.manifest.shards.len(),
        dir.join(crate::data::shard::MANIFEST).display()
    );
    Ok(())
}

/// Running per-class sums of one numeric field: count, and per element sum / sum of squares.
#[derive(Clone)]
struct ClassStats {
    count: u64,
    sum: Vec<f64>,
    sum2: Vec<f64>,
}

fn inspect(dir: PathBuf) -> anyhow::Result<()> {
    let set = ShardSet::open(&dir, false)?;
    let m = &set.manifest;
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!(
        "dataset  {} ({} v{}, {})",
        dir.display(),
        m.format,
        m.version,
        m.created_by
    );
    if !m.source.is_empty() {
        println!("source   {}", m.source);
    }
    println!(
        "samples  {} in {} shard(s), {:.1} MiB",
        m.num_samples,
        m.shards.len(),
        bytes as f64 / (1 << 20) as f64
    );
    println!("fields");
    for f in &m.fields {
        let shape = f
            .shape
            .as_ref()
            .map(|s| format!("{s:?}"))
            .unwrap_or_else(|| "variable".into());
        let label = if m.label.as_deref() == Some(f.name.as_str()) {
            " (label)"
        } else {
            ""
        };
        println!(
            "  {:<12} {:<4} {:<14} {}{label}",
            f.name,
            format!("{:?}", f.dtype).to_lowercase(),
            shape,
            f.kind
        );
    }
    for (k, s) in &m.stats {
        if s.mean.len() == 1 {
            println!("stats    {k}: mean {:.4} std {:.4}", s.mean[0], s.std[0]);
        } else {
            println!(
                "stats    {k}: per-feature mean/std over {} features",
                s.mean.len()
            );
        }
    }
    for (col, voc) in &m.categories {
        println!("category {col}: {} values ({})", voc.len(), voc.join(", "));
    }
    let Some(label) = m.label.as_ref().and_then(|l| set.field_index(l)) else {
        return Ok(());
    };
    if m.fields[label].dtype == Dtype::F32 {
        return Ok(());
    }
    // Group-by label: per class, count and mean/std of each numeric fixed field (per
    // feature for small fields, over all elements for large ones such as images).
    let numeric: Vec<usize> = (0..m.fields.len())
        .filter(|&i| i != label && m.fields[i].shape.is_some())
        .collect();
    let k = m.classes.len().max(1);
    let width = |f: usize| {
        let n = m.fields[f].numel().unwrap_or(1);
        if n <= 32 {
            n
        } else {
            1
        }
    };
    let empty: Vec<ClassStats> = numeric
        .iter()
        .map(|&f| ClassStats {
            count: 0,
            sum: vec![0.0; width(f)],
            sum2: vec![0.0; width(f)],
        })
        .collect();
    let n = set.len();
    let chunk = 4096;
    let partials: Vec<Vec<Vec<ClassStats>>> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![empty.clone(); k];
            for i in c * chunk..((c + 1) * chunk).min(n) {
                let y = set.label(label, i);
                let y = if y >= 0 && (y as usize) < k {
                    y as usize
                } else {
                    continue;
                };
                for (slot, &f) in acc[y].iter_mut().zip(&numeric) {
                    let vals = values(&set, f, i);
                    slot.count += 1;
                    if slot.sum.len() == 1 && vals.len() > 1 {
                        let s: f64 = vals.iter().sum();
                        let s2: f64 = vals.iter().map(|v| v * v).sum();
                        slot.sum[0] += s / vals.len() as f64;
                        slot.sum2[0] += s2 / vals.len() as f64;
                    } else {
                        for (j, v) in vals.iter().enumerate() {
                            slot.sum[j] += v;
                            slot.sum2[j] += v * v;
                        }
                    }
                }
            }
            acc
        })
        .collect();
    let mut total = vec![empty; k];
    for p in partials {
        for (t, pc) in total.iter_mut().zip(p) {
            for (a, b) in t.iter_mut().zip(pc) {
                a.count += b.count;
                a.sum.iter_mut().zip(&b.sum).for_each(|(x, y)| *x += y);
                a.sum2.iter_mut().zip(&b.sum2).for_each(|(x, y)| *x += y);
            }
        }
    }
    println!("classes  {} (count, share)", m.classes.len());
    for (c, name) in m.classes.iter().enumerate() {
        let count = total[c].first().map(|s| s.count).unwrap_or(0);
        println!(
            "  {c:>3} {name:<20} {count:>8} {:>6.1}%",
            100.0 * count as f64 / n.max(1) as f64
        );
    }
    for (fi, &f) in numeric.iter().enumerate() {
        let field = &m.fields[f];
        let w = total[0][fi].sum.len();
        let names: Vec<String> = if w == 1 {
            vec![format!("{} (all values)", field.name)]
        } else if m.feature_names.len() == w {
            m.feature_names.clone()
        } else {
            (0..w).map(|j| format!("{}[{j}]", field.name)).collect()
        };
        println!("per class: mean ± std of `{}`", field.name);
        print!("  {:<28}", "feature");
        for name in &m.classes {
            print!(" {:>18}", crate::data::truncate(name, 18));
        }
        println!();
        for (j, name) in names.iter().enumerate() {
            print!("  {:<28}", crate::data::truncate(name, 28));
            for t in &total {
                let s = &t[fi];
                let cnt = s.count.max(1) as f64;
                let mean = s.sum[j] / cnt;
                let sd = (s.sum2[j] / cnt - mean * mean).max(0.0).sqrt();
                print!(" {:>18}", format!("{mean:.3} ± {sd:.3}"));
            }
            println!();
        }
    }
    Ok(())
}

fn values(set: &ShardSet, f: usize, i: usize) -> Vec<f64> {
    let b = set.bytes(f, i);
    match set.manifest.fields[f].dtype {
        Dtype::U8 => b.iter().map(|&v| v as f64).collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::U32 => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
    }
}
