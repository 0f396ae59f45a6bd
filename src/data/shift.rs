//! Random translation of image-shaped training samples (`data.random_shift`): each sample is
//! moved by up to `pad` pixels in each direction and the vacated pixels are zero, which is
//! torchvision's `RandomCrop(size, padding=pad)`. It applies to any source whose samples are
//! `[h, w]` or `[c, h, w]` images stored flat (shards of fixed-shape tensors such as
//! Fashion-MNIST, encoded images after their pipeline). The offsets are keyed by
//! `(run.seed, epoch, sample)`, so a batch is the same whatever the thread count, rank or
//! resume point. Evaluation batches are not moved.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::source::{Augment, Source};
use super::{Batch, Targets};
use crate::rng::Rng;
use crate::Result;

/// A source whose training batches are randomly translated.
pub struct Shifted {
    inner: Box<dyn Source>,
    pad: usize,
    /// `[channels, height, width]` of a sample.
    shape: [usize; 3],
}

impl Shifted {
    /// Wraps `inner`, whose samples are `shape` images, with shifts of up to `pad` pixels.
    pub fn new(inner: Box<dyn Source>, shape: [usize; 3], pad: usize) -> Self {
        Self { inner, pad, shape }
    }
}

/// `x` (`[c, h, w]`) moved by `(dy, dx)` into `out`; pixels that come from outside are 0.
pub fn shift_image(x: &[f32], shape: [usize; 3], dy: isize, dx: isize, out: &mut [f32]) {
    let [c, h, w] = shape;
    out.fill(0.0);
    // Output row y reads input row y - dy; output column x reads input column x - dx.
    let (y0, y1) = (dy.max(0) as usize, (h as isize + dy.min(0)).max(0) as usize);
    let (x0, x1) = (dx.max(0) as usize, (w as isize + dx.min(0)).max(0) as usize);
    if y0 >= y1 || x0 >= x1 {
        return;
    }
    for ch in 0..c {
        let (src, dst) = (&x[ch * h * w..][..h * w], &mut out[ch * h * w..][..h * w]);
        for y in y0..y1 {
            let sy = (y as isize - dy) as usize;
            let sx = (x0 as isize - dx) as usize;
            dst[y * w + x0..y * w + x1].copy_from_slice(&src[sy * w + sx..][..x1 - x0]);
        }
    }
}

impl Source for Shifted {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch> {
        self.inner.gather(idx, device)
    }

    fn gather_augmented(
        &self,
        idx: &[u32],
        aug: Option<Augment>,
        device: &Device,
    ) -> Result<Batch> {
        let Some(a) = aug else {
            return self.inner.gather_augmented(idx, aug, device);
        };
        // Collated on the CPU, shifted, then moved to `device` once.
        let batch = self.inner.gather_augmented(idx, aug, &Device::Cpu)?;
        let d: usize = self.shape.iter().product();
        if batch.x.dims() != [idx.len(), d] {
            return Err(crate::Error::Data(format!(
                "data.random_shift: samples of {:?} values do not form {:?} images",
                &batch.x.dims()[1..],
                self.shape
            )));
        }
        let x: Vec<f32> = batch.x.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; x.len()];
        let span = 2 * self.pad as u64 + 1;
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(idx.par_iter())
            .for_each(|((o, x), &i)| {
                let mut rng = Rng::keyed(a.seed, "shift", (a.epoch << 32) | i as u64);
                let dy = rng.below(span) as isize - self.pad as isize;
                let dx = rng.below(span) as isize - self.pad as isize;
                shift_image(x, self.shape, dy, dx, o);
            });
        Ok(Batch {
            x: Tensor::from_vec(out, (idx.len(), d), device)?,
            y: batch.y.to_device(device)?,
            mask: batch.mask.map(|m| m.to_device(device)).transpose()?,
            n: batch.n,
        })
    }

    fn targets(&self) -> Result<Targets> {
        self.inner.targets()
    }

    fn augments(&self) -> bool {
        true
    }

    fn blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        self.inner.blocks()
    }

    fn prefetch(&self) -> bool {
        self.inner.prefetch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_move_pixels_and_fill_with_zero() {
        // 2 channels of 3 × 4.
        let x: Vec<f32> = (1..=24).map(|v| v as f32).collect();
        let mut out = vec![0f32; 24];
        shift_image(&x, [2, 3, 4], 0, 0, &mut out);
        assert_eq!(out, x);
        shift_image(&x, [2, 3, 4], 1, -1, &mut out);
        #[rustfmt::skip]
        let want = [
            0.0, 0.0, 0.0, 0.0,   2.0, 3.0, 4.0, 0.0,   6.0, 7.0, 8.0, 0.0,
            0.0, 0.0, 0.0, 0.0,   14.0, 15.0, 16.0, 0.0,   18.0, 19.0, 20.0, 0.0,
        ];
        assert_eq!(out, want);
        shift_image(&x, [2, 3, 4], -2, 3, &mut out);
        #[rustfmt::skip]
        let want2 = [
            0.0, 0.0, 0.0, 9.0,   0.0, 0.0, 0.0, 0.0,   0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 21.0,   0.0, 0.0, 0.0, 0.0,   0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(out, want2);
        // Moved entirely out of the frame.
        shift_image(&x, [2, 3, 4], 0, 4, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    fn batch_x(src: &Shifted, idx: &[u32], aug: Option<Augment>) -> Vec<f32> {
        let b = src.gather_augmented(idx, aug, &Device::Cpu).unwrap();
        b.x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn training_batches_are_shifted_per_sample_and_keyed_by_epoch() {
        // 40 distinct 1 × 5 × 5 images (all pixels non-zero).
        let (n, d) = (40usize, 25usize);
        let x: Vec<f32> = (0..n * d).map(|v| 1.0 + v as f32).collect();
        let y = Targets::Classes(vec![0; n]);
        let data = super::super::Dataset {
            x: x.clone(),
            n,
            d,
            y,
        };
        let src = Shifted::new(Box::new(data), [1, 5, 5], 2);
        assert!(src.augments());
        let idx: Vec<u32> = (0..n as u32).rev().collect();
        let plain = |i: u32| x[i as usize * d..][..d].to_vec();
        // Evaluation: unchanged.
        let eval = batch_x(&src, &idx, None);
        for (row, &i) in eval.chunks(d).zip(&idx) {
            assert_eq!(row, plain(i));
        }
        let a = Augment { seed: 7, epoch: 3 };
        let e3 = batch_x(&src, &idx, Some(a));
        // The same key gives the same batch, and a sample's shift does not depend on the
        // other samples in the batch or their order.
        assert_eq!(e3, batch_x(&src, &idx, Some(a)));
        let alone = batch_x(&src, &idx[5..6], Some(a));
        assert_eq!(alone, e3[5 * d..6 * d]);
        // Every row is its own image moved by some (dy, dx) in [-2, 2]².
        let mut moved = 0;
        for (row, &i) in e3.chunks(d).zip(&idx) {
            let found = (-2..=2isize)
                .flat_map(|dy| (-2..=2isize).map(move |dx| (dy, dx)))
                .any(|(dy, dx)| {
                    let mut o = vec![0f32; d];
                    shift_image(&plain(i), [1, 5, 5], dy, dx, &mut o);
                    o == row
                });
            assert!(found, "sample {i} is not a shift of itself");
            moved += usize::from(row != plain(i));
        }
        assert!(moved > n / 2, "only {moved} of {n} samples moved");
        // Another epoch draws other shifts.
        assert_ne!(e3, batch_x(&src, &idx, Some(Augment { seed: 7, epoch: 4 })));
    }
}
