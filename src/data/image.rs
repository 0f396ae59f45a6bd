//! The image pipeline: decode (JPEG/PNG), resize, random or center crop, horizontal flip,
//! normalize, in parallel, into `[channels, height, width]` f32 (the torchvision layout).
//!
//! Random choices (crop offset, flip) come from the keyed stream
//! `(seed, "augment", epoch << 32 | sample)`, so a sample is augmented the same way whatever the
//! thread count, batch composition or resume point.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::shard::{plan_shards, write_shards, Column, Dtype, Field, Manifest};
use super::shardset::ShardSet;
use super::source::{Augment, Source};
use super::{Batch, Targets};
use crate::rng::Rng;
use crate::{Error, Result};

/// ImageNet channel means and standard deviations (torchvision's defaults).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `[data.image]`: how encoded images become model input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Resize every image to `[height, width]` first (bilinear).
    pub resize: Option<[usize; 2]>,
    /// Crop `[height, width]` out of the resized image: at random when training with
    /// `random_crop`, else from the center. Default: no crop.
    pub crop: Option<[usize; 2]>,
    pub random_crop: bool,
    /// Flip horizontally with probability 0.5 when training.
    pub hflip: bool,
    /// 1 (grayscale) or 3 (RGB) channels.
    pub channels: usize,
    /// Per-channel mean and std applied after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            resize: None,
            crop: None,
            random_crop: false,
            hflip: false,
            channels: 3,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }
    }
}

impl ImageConfig {
    /// Checks the values; `origin` names the config file in errors.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, msg: &str| {
            Err(Error::Config(format!(
                "{origin}: `data.image.{key}`: {msg}"
            )))
        };
        if self.channels != 1 && self.channels != 3 {
            return bad("channels", "expected 1 (grayscale) or 3 (RGB)");
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return bad("mean", "mean and std need one value per channel");
        }
        if self.std.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return bad("std", "every value must be positive");
        }
        for (k, v) in [("resize", self.resize), ("crop", self.crop)] {
            if v.is_some_and(|[h, w]| h == 0 || w == 0 || h > 8192 || w > 8192) {
                return bad(k, "expected [height, width] between 1 and 8192");
            }
        }
        if let (Some([rh, rw]), Some([ch, cw])) = (self.resize, self.crop) {
            if ch > rh || cw > rw {
                return bad("crop", "the crop must fit inside `resize`");
            }
        }
        Ok(())
    }
}

/// Decodes one encoded image and applies the pipeline, writing `channels × h × w` values.
/// `rng` is `None` for evaluation (center crop, no flip).
pub fn transform(
    bytes: &[u8],
    cfg: &ImageConfig,
    out_hw: (usize, usize),
    rng: Option<&mut Rng>,
    out: &mut [f32],
) -> std::result::Result<(), String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    let c = cfg.channels;
    let (pixels, mut w, mut h): (Vec<u8>, usize, usize) = if c == 1 {
        let g = img.to_luma8();
        let (w, h) = (g.width() as usize, g.height() as usize);
        (g.into_raw(), w, h)
    } else {
        let g = img.to_rgb8();
        let (w, h) = (g.width() as usize, g.height() as usize);
        (g.into_raw(), w, h)
    };
    let mut pixels = pixels;
    if let Some([rh, rw]) = cfg.resize {
        if (rh, rw) != (h, w) {
            pixels = if c == 1 {
                let b =
                    image::GrayImage::from_raw(w as u32, h as u32, pixels).ok_or("bad buffer")?;
                image::imageops::resize(&b, rw as u32, rh as u32, FilterType::Triangle).into_raw()
            } else {
                let b =
                    image::RgbImage::from_raw(w as u32, h as u32, pixels).ok_or("bad buffer")?;
                image::imageops::resize(&b, rw as u32, rh as u32, FilterType::Triangle).into_raw()
            };
            (h, w) = (rh, rw);
        }
    }
    let (oh, ow) = out_hw;
    if oh > h || ow > w {
        return Err(format!("image is {h}x{w} after resizing, smaller than the {oh}x{ow} crop; set data.image.resize"));
    }
    let mut rng = rng;
    let (top, left) = match (&mut rng, cfg.random_crop) {
        (Some(r), true) => (
            r.below((h - oh + 1) as u64) as usize,
            r.below((w - ow + 1) as u64) as usize,
        ),
        _ => ((h - oh) / 2, (w - ow) / 2),
    };
    let flip = match (&mut rng, cfg.hflip) {
        (Some(r), true) => r.next_f32() < 0.5,
        _ => false,
    };
    let scale: Vec<f32> = cfg.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
    let shift: Vec<f32> = cfg.mean.iter().zip(&cfg.std).map(|(m, s)| m / s).collect();
    for ch in 0..c {
        let plane = &mut out[ch * oh * ow..(ch + 1) * oh * ow];
        for y in 0..oh {
            let src_row = (top + y) * w;
            for x in 0..ow {
                let sx = if flip { left + ow - 1 - x } else { left + x };
                let v = pixels[(src_row + sx) * c + ch] as f32;
                plane[y * ow + x] = v * scale[ch] - shift[ch];
            }
        }
    }
    Ok(())
}

/// Encoded images (`image` field, variable length) with labels, run through [`transform`].
pub struct ImageSource {
    pub set: ShardSet,
    x: usize,
    y: usize,
    cfg: ImageConfig,
    out_hw: (usize, usize),
}

impl ImageSource {
    /// `out_hw`: the size every image has after the pipeline (the crop, or the resize).
    pub fn new(set: ShardSet, input: &str, label: &str, cfg: ImageConfig) -> Result<Self> {
        let dir = set.dir.display().to_string();
        let x = set
            .field_index(input)
            .ok_or_else(|| Error::Data(format!("{dir}: no field `{input}`")))?;
        let y = set
            .field_index(label)
            .ok_or_else(|| Error::Data(format!("{dir}: no label field `{label}`")))?;
        let out_hw = match (cfg.crop, cfg.resize) {
            (Some([h, w]), _) | (None, Some([h, w])) => (h, w),
            (None, None) => {
                return Err(Error::Config(format!(
                    "{dir} holds encoded images of any size; set data.image.resize (and optionally crop) so that a batch has one shape"
                )))
            }
        };
        Ok(Self {
            set,
            x,
            y,
            cfg,
            out_hw,
        })
    }

    /// Values per sample: channels × height × width.
    pub fn dim(&self) -> usize {
        self.cfg.channels * self.out_hw.0 * self.out_hw.1
    }

    pub fn shape(&self) -> [usize; 3] {
        [self.cfg.channels, self.out_hw.0, self.out_hw.1]
    }
}

impl Source for ImageSource {
    fn len(&self) -> usize {
        self.set.len()
    }

    fn blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        Some(self.set.blocks())
    }

    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch> {
        self.gather_augmented(idx, None, device)
    }

    fn gather_augmented(
        &self,
        idx: &[u32],
        aug: Option<Augment>,
        device: &Device,
    ) -> Result<Batch> {
        let d = self.dim();
        let mut x = vec![0f32; idx.len() * d];
        x.par_chunks_mut(d)
            .zip(idx.par_iter())
            .try_for_each(|(row, &i)| {
                let mut rng =
                    aug.map(|a| Rng::keyed(a.seed, "augment", (a.epoch << 32) | i as u64));
                transform(
                    self.set.bytes(self.x, i as usize),
                    &self.cfg,
                    self.out_hw,
                    rng.as_mut(),
                    row,
                )
                .map_err(|e| Error::Data(format!("{}: sample {i}: {e}", self.set.dir.display())))
            })?;
        let x = Tensor::from_vec(x, (idx.len(), d), device)?;
        let y: Vec<u32> = idx
            .iter()
            .map(|&i| self.set.label(self.y, i as usize) as u32)
            .collect();
        let n = idx.len();
        Ok(Batch {
            x,
            y: Tensor::from_vec(y, n, device)?,
            n,
            mask: None,
        })
    }

    fn augments(&self) -> bool {
        self.cfg.random_crop || self.cfg.hflip
    }

    fn targets(&self) -> Result<Targets> {
        Ok(Targets::Classes(
            (0..self.len())
                .map(|i| self.set.label(self.y, i) as u32)
                .collect(),
        ))
    }
}

/// Packs a folder with one subfolder per class (`root/<class>/*.jpg|*.jpeg|*.png`), sorted by
/// class then file name. Images are stored encoded (field `image`, variable-length u8), or with
/// `decode_to = Some([h, w])` decoded, resized and stored as u8 `[h, w, channels]`.
pub fn pack_image_folder(
    root: &Path,
    out: &Path,
    decode_to: Option<([usize; 2], usize)>,
    shard_bytes: u64,
    progress: super::pack::OnProgress,
) -> Result<Manifest> {
    let err = |e: std::io::Error| Error::io(root, e);
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(err)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(Error::Data(format!(
            "{}: no class subfolders; expected {0}/<class>/<image files>",
            root.display()
        )));
    }
    let mut files: Vec<(std::path::PathBuf, i64)> = Vec::new();
    for (k, c) in classes.iter().enumerate() {
        let mut fs: Vec<std::path::PathBuf> = std::fs::read_dir(root.join(c))
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                })
            })
            .collect();
        fs.sort();
        files.extend(fs.into_iter().map(|p| (p, k as i64)));
    }
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: no .jpg, .jpeg or .png files in the class folders",
            root.display()
        )));
    }
    // Read (and if asked, decode) every file in parallel; the order stays that of `files`.
    let payloads: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(p, _)| {
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            match decode_to {
                None => {
                    image::guess_format(&bytes)
                        .map_err(|e| Error::Data(format!("{}: not an image: {e}", p.display())))?;
                    Ok(bytes)
                }
                Some(([h, w], c)) => {
                    let cfg = ImageConfig {
                        resize: Some([h, w]),
                        channels: c,
                        mean: vec![0.0; c],
                        std: vec![1.0 / 255.0; c],
                        ..Default::default()
                    };
                    let mut buf = vec![0f32; c * h * w];
                    transform(&bytes, &cfg, (h, w), None, &mut buf)
                        .map_err(|e| Error::Data(format!("{}: {e}", p.display())))?;
                    // CHW floats in 0..=255 back to HWC bytes.
                    let mut hwc = vec![0u8; h * w * c];
                    for ch in 0..c {
                        for i in 0..h * w {
                            hwc[i * c + ch] = buf[ch * h * w + i].round().clamp(0.0, 255.0) as u8;
                        }
                    }
                    Ok(hwc)
                }
            }
        })
        .collect::<Result<_>>()?;
    let fields = match decode_to {
        None => vec![
            Field::variable("image", Dtype::U8, "image"),
            Field::fixed("label", Dtype::I64, &[], "label"),
        ],
        Some(([h, w], c)) => vec![
            Field::fixed("image", Dtype::U8, &[h, w, c], "image-tensor"),
            Field::fixed("label", Dtype::I64, &[], "label"),
        ],
    };
    let ranges = plan_shards(payloads.iter().map(|p| p.len() as u64 + 8), shard_bytes);
    let shards = write_shards(
        out,
        &fields,
        &ranges,
        |r| {
            let y: Vec<u8> = files[r.clone()]
                .iter()
                .flat_map(|(_, k)| k.to_le_bytes())
                .collect();
            let x = match decode_to {
                Some(_) => Column::Fixed(payloads[r].concat()),
                None => {
                    let mut data = Vec::new();
                    let mut offsets = vec![0i64];
                    for p in &payloads[r] {
                        data.extend_from_slice(p);
                        offsets.push(data.len() as i64);
                    }
                    Column::Var { data, offsets }
                }
            };
            Ok(vec![x, Column::Fixed(y)])
        },
        progress,
    )?;
    let mut m = Manifest::new(fields, shards, &format!("image folder: {}", root.display()));
    m.label = Some("label".into());
    m.classes = classes;
    m.write(out)?;
    Ok(m)
}
