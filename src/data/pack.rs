//! `wick data pack`: turning source files into shards.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use rayon::prelude::*;

use super::shard::{plan_shards, write_shards, Column, Dtype, Field, Manifest, Stats};
use crate::{Error, Result};

/// Progress reporting while packing: called with (samples done, total).
pub type OnProgress<'a> = &'a (dyn Fn(usize, usize) + Sync);

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::Data(format!("{}: invalid gzip data: {e}", path.display())))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX file (the MNIST format): dimensions and u8 data.
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an IDX file of unsigned bytes (gzipped or not).
pub fn read_idx(path: &Path) -> Result<Idx> {
    let bytes = read_maybe_gz(path)?;
    parse_idx(&bytes).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Parses IDX bytes; the error says what is wrong.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<Idx, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic number)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
            bytes[2]
        ));
    }
    let nd = bytes[3] as usize;
    if nd == 0 || bytes.len() < 4 + 4 * nd {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("IDX dimensions overflow")?;
    let data = &bytes[4 + 4 * nd..];
    if data.len() != n {
        return Err(format!(
            "IDX header promises {n} bytes of data ({dims:?}) but the file has {}",
            data.len()
        ));
    }
    Ok(Idx {
        dims,
        data: data.to_vec(),
    })
}

/// Mean and population standard deviation of all values (f64; chunked for parallelism but
/// summed in a fixed order, so the result does not depend on the thread count).
fn scalar_stats(data: &[u8]) -> Stats {
    let chunk = 1 << 20;
    let parts: Vec<(f64, f64)> = data
        .par_chunks(chunk)
        .map(|c| {
            let s: u64 = c.iter().map(|&v| v as u64).sum();
            let s2: u64 = c.iter().map(|&v| (v as u64) * (v as u64)).sum();
            (s as f64, s2 as f64)
        })
        .collect();
    let n = data.len().max(1) as f64;
    let (s, s2) = parts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let mean = s / n;
    let var = (s2 / n - mean * mean).max(0.0);
    Stats {
        mean: vec![mean],
        std: vec![var.sqrt()],
    }
}

/// Packs an IDX image file and its IDX label file (MNIST / Fashion-MNIST) into `out`:
/// fields `image` (u8, `[rows, cols]`) and `label` (i64).
pub fn pack_idx(
    images: &Path,
    labels: &Path,
    out: &Path,
    class_names: Option<Vec<String>>,
    shard_bytes: u64,
    progress: OnProgress,
) -> Result<Manifest> {
    let im = read_idx(images)?;
    let lb = read_idx(labels)?;
    if im.dims.len() != 3 {
        return Err(Error::Data(format!(
            "{}: expected images of shape [n, rows, cols], found {:?}",
            images.display(),
            im.dims
        )));
    }
    if lb.dims.len() != 1 || lb.dims[0] != im.dims[0] {
        return Err(Error::Data(format!(
            "{}: {:?} labels for {} images; pass the label file that belongs to {}",
            labels.display(),
            lb.dims,
            im.dims[0],
            images.display()
        )));
    }
    let (n, h, w) = (im.dims[0], im.dims[1], im.dims[2]);
    let k = lb
        .data
        .iter()
        .copied()
        .max()
        .map(|m| m as usize + 1)
        .unwrap_or(0);
    let classes = match class_names {
        Some(c) => {
            if c.len() < k {
                return Err(Error::Data(format!(
                    "--class-names gives {} names but the labels go up to {}",
                    c.len(),
                    k - 1
                )));
            }
            c
        }
        None => (0..k).map(|i| i.to_string()).collect(),
    };
    let fields = vec![
        Field::fixed("image", Dtype::U8, &[h, w], "image-tensor"),
        Field::fixed("label", Dtype::I64, &[], "label"),
    ];
    let per = (h * w + 8) as u64;
    let ranges = plan_shards(std::iter::repeat_n(per, n), shard_bytes);
    let shards = write_shards(
        out,
        &fields,
        &ranges,
        |r| {
            let img = im.data[r.start * h * w..r.end * h * w].to_vec();
            let lab: Vec<u8> = lb.data[r.clone()]
                .iter()
                .flat_map(|&l| (l as i64).to_le_bytes())
                .collect();
            Ok(vec![Column::Fixed(img), Column::Fixed(lab)])
        },
        progress,
    )?;
    let mut m = Manifest::new(
        fields,
        shards,
        &format!("idx: {} + {}", images.display(), labels.display()),
    );
    m.label = Some("label".into());
    m.classes = classes;
    m.stats.insert("image".into(), scalar_stats(&im.data));
    m.write(out)?;
    Ok(m)
}

/// The longest cell an error message quotes whole.
const CELL_CHARS: usize = 41;

/// Packs a CSV table: numeric columns become the f32 field `features`, text columns are
/// indexed as categories (the index is the feature value; the vocabulary goes into the
/// manifest), and `label` becomes an i64 class index (or f32 for `regression`).
pub fn pack_csv(
    path: &Path,
    label: &str,
    regression: bool,
    out: &Path,
    shard_bytes: u64,
    progress: OnProgress,
) -> Result<Manifest> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| Error::Data(format!("{}: cannot open: {e}", path.display())))?;
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| Error::Data(format!("{}: cannot read the header: {e}", path.display())))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.iter().all(|h| h.is_empty()) {
        return Err(Error::Data(format!(
            "{}: the file is empty; expected a header row, then data rows",
            path.display()
        )));
    }
    if let Some(dup) = header
        .iter()
        .enumerate()
        .find(|(i, h)| header[..*i].contains(h))
        .map(|(_, h)| h)
    {
        return Err(Error::Data(format!(
            "{}: the header names column `{dup}` twice; column names must be unique",
            path.display()
        )));
    }
    let lc = header.iter().position(|h| h == label).ok_or_else(|| {
        Error::Data(format!(
            "{}: no label column `{label}`; the columns are {}",
            path.display(),
            header.join(", ")
        ))
    })?;
    let records: Vec<csv::StringRecord> = rdr
        .records()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Data(format!("{}: malformed CSV: {e}", path.display())))?;
    if records.is_empty() {
        return Err(Error::Data(format!("{}: no data rows", path.display())));
    }
    let feat_cols: Vec<usize> = (0..header.len()).filter(|&c| c != lc).collect();
    if feat_cols.is_empty() {
        return Err(Error::Data(format!(
            "{}: the label `{label}` is the only column; add feature columns",
            path.display()
        )));
    }
    // CSV line numbers: the header is line 1.
    if let Some(i) = records
        .iter()
        .position(|r| r.get(lc).is_none_or(|s| s.is_empty()))
    {
        return Err(Error::Data(format!(
            "{}: line {}: the label `{label}` is empty; give every row a label or remove the row",
            path.display(),
            i + 2
        )));
    }
    // A column is categorical if any value is not a number.
    let categorical: Vec<bool> = feat_cols
        .par_iter()
        .map(|&c| {
            records
                .iter()
                .any(|r| r.get(c).unwrap_or("").parse::<f32>().is_err())
        })
        .collect();
    let mut categories: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (&c, &cat) in feat_cols.iter().zip(&categorical) {
        if cat {
            let mut v: Vec<String> = records.iter().map(|r| r[c].to_string()).collect();
            v.sort();
            v.dedup();
            categories.insert(header[c].clone(), v);
        }
    }
    let labels_text: Vec<&str> = records.iter().map(|r| r.get(lc).unwrap_or("")).collect();
    let mut classes: Vec<String> = Vec::new();
    if !regression {
        classes = labels_text.iter().map(|s| s.to_string()).collect();
        if classes.iter().all(|c| c.parse::<f64>().is_ok()) {
            classes.sort_by(|a, b| {
                a.parse::<f64>()
                    .unwrap()
                    .total_cmp(&b.parse::<f64>().unwrap())
            });
        } else {
            classes.sort();
        }
        classes.dedup();
    }
    let class_index: std::collections::HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let d = feat_cols.len();
    let n = records.len();
    // Parse rows in parallel into a row-major matrix.
    let rows: Vec<Vec<f32>> = records
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            feat_cols
                .iter()
                .zip(&categorical)
                .map(|(&c, &cat)| {
                    if cat {
                        let voc = &categories[&header[c]];
                        Ok(voc.binary_search(&r[c].to_string()).unwrap() as f32)
                    } else {
                        match r[c].parse::<f32>() {
                            Ok(v) if v.is_finite() => Ok(v),
                            _ => Err(Error::Data(format!(
                                "{}: line {}, column `{}`: \"{}\" is not a finite number (f32); fix or remove the value",
                                path.display(),
                                i + 2,
                                header[c],
                                super::truncate(&r[c], CELL_CHARS)
                            ))),
                        }
                    }
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    let y_bytes: Vec<Vec<u8>> = labels_text
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if regression {
                match s.parse::<f32>() {
                    Ok(v) if v.is_finite() => Ok(v.to_le_bytes().to_vec()),
                    _ => Err(Error::Data(format!(
                        "{}: line {}: label \"{}\" is not a finite number (--regression); fix the value, or pack without --regression for classes",
                        path.display(),
                        i + 2,
                        super::truncate(s, CELL_CHARS)
                    ))),
                }
            } else {
                let k = class_index[s];
                Ok((k as i64).to_le_bytes().to_vec())
            }
        })
        .collect::<Result<_>>()?;
    let fields = vec![
        Field::fixed("features", Dtype::F32, &[d], "tensor"),
        if regression {
            Field::fixed("label", Dtype::F32, &[], "target")
        } else {
            Field::fixed("label", Dtype::I64, &[], "label")
        },
    ];
    let ranges = plan_shards(std::iter::repeat_n((d * 4 + 8) as u64, n), shard_bytes);
    let shards = write_shards(
        out,
        &fields,
        &ranges,
        |r| {
            let x: Vec<u8> = rows[r.clone()]
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let y: Vec<u8> = y_bytes[r].iter().flatten().copied().collect();
            Ok(vec![Column::Fixed(x), Column::Fixed(y)])
        },
        progress,
    )?;
    // Per-feature mean / population std (f64, sequential: deterministic).
    let mut mean = vec![0f64; d];
    let mut m2 = vec![0f64; d];
    for r in &rows {
        for (j, &v) in r.iter().enumerate() {
            mean[j] += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    for r in &rows {
        for (j, &v) in r.iter().enumerate() {
            m2[j] += (v as f64 - mean[j]).powi(2);
        }
    }
    let std: Vec<f64> = m2.iter().map(|s| (s / n as f64).sqrt()).collect();
    let mut m = Manifest::new(fields, shards, &format!("csv: {}", path.display()));
    m.label = Some("label".into());
    m.classes = classes;
    m.feature_names = feat_cols.iter().map(|&c| header[c].clone()).collect();
    m.stats.insert("features".into(), Stats { mean, std });
    m.categories = categories;
    m.write(out)?;
    Ok(m)
}

/// Packs labelled text: a CSV with `text_key` and `label_key` columns, or JSON lines (`.jsonl`)
/// with those keys. The text is stored raw (variable-length UTF-8 field `text`); tokenization
/// happens at load time. Errors name the line: invalid UTF-8, empty text, a missing key.
pub fn pack_text(
    path: &Path,
    text_key: &str,
    label_key: &str,
    out: &Path,
    shard_bytes: u64,
    progress: OnProgress,
) -> Result<Manifest> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let err =
        |line: usize, msg: String| Error::Data(format!("{}: line {line}: {msg}", path.display()));
    let mut rows: Vec<(String, String)> = Vec::new();
    let jsonl = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "jsonl" || e == "json");
    if jsonl {
        for (i, line) in raw.split(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            let text = std::str::from_utf8(line).map_err(|e| {
                err(
                    line_no,
                    format!(
                        "invalid UTF-8 at byte {}; re-encode the file as UTF-8",
                        e.valid_up_to()
                    ),
                )
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| err(line_no, format!("invalid JSON: {e}")))?;
            let t = v
                .get(text_key)
                .and_then(|t| t.as_str())
                .ok_or_else(|| err(line_no, format!("no string `{text_key}`")))?;
            let l = match v.get(label_key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(serde_json::Value::Bool(b)) => b.to_string(),
                _ => {
                    return Err(err(
                        line_no,
                        format!("no `{label_key}` (string, number or boolean)"),
                    ))
                }
            };
            rows.push((t.to_string(), l));
        }
    } else {
        let mut rdr = csv::ReaderBuilder::new().from_reader(&raw[..]);
        let header = rdr
            .byte_headers()
            .map_err(|e| err(1, format!("cannot read the header: {e}")))?
            .clone();
        let col = |k: &str| {
            header
                .iter()
                .position(|h| h == k.as_bytes())
                .ok_or_else(|| err(1, format!("no column `{k}`")))
        };
        let (tc, lc) = (col(text_key)?, col(label_key)?);
        for rec in rdr.byte_records() {
            let rec =
                rec.map_err(|e| Error::Data(format!("{}: malformed CSV: {e}", path.display())))?;
            let line_no = rec.position().map(|p| p.line() as usize).unwrap_or(0);
            let field = |c: usize| {
                std::str::from_utf8(&rec[c])
                    .map(str::to_string)
                    .map_err(|e| err(line_no, format!("invalid UTF-8 at byte {} of the field; re-encode the file as UTF-8", e.valid_up_to())))
            };
            rows.push((field(tc)?, field(lc)?));
        }
    }
    if rows.is_empty() {
        return Err(Error::Data(format!("{}: no rows", path.display())));
    }
    if let Some(i) = rows.iter().position(|(t, _)| t.trim().is_empty()) {
        return Err(Error::Data(format!(
            "{}: row {}: the text is empty",
            path.display(),
            i + 1
        )));
    }
    let mut classes: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect();
    classes.sort();
    classes.dedup();
    let index: std::collections::HashMap<&str, i64> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as i64))
        .collect();
    let fields = vec![
        Field::variable("text", Dtype::U8, "text"),
        Field::fixed("label", Dtype::I64, &[], "label"),
    ];
    let ranges = plan_shards(rows.iter().map(|(t, _)| t.len() as u64 + 16), shard_bytes);
    let shards = write_shards(
        out,
        &fields,
        &ranges,
        |r| {
            let mut data = Vec::new();
            let mut offsets = vec![0i64];
            for (t, _) in &rows[r.clone()] {
                data.extend_from_slice(t.as_bytes());
                offsets.push(data.len() as i64);
            }
            let y: Vec<u8> = rows[r]
                .iter()
                .flat_map(|(_, l)| index[l.as_str()].to_le_bytes())
                .collect();
            Ok(vec![Column::Var { data, offsets }, Column::Fixed(y)])
        },
        progress,
    )?;
    let mut m = Manifest::new(fields, shards, &format!("text: {}", path.display()));
    m.label = Some("label".into());
    m.classes = classes;
    m.write(out)?;
    Ok(m)
}
