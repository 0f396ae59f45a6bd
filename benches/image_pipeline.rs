//! Image pipeline throughput at 1 and 2 threads: JPEG decode (128×128 RGB) → resize to 72×72 →
//! random 64×64 crop → horizontal flip → ImageNet normalization, batches of 64, from shards of
//! encoded images. The 512 JPEGs are generated once under `target/image-bench/`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wick::data::image::{pack_image_folder, ImageConfig, ImageSource};
use wick::data::{Augment, BatchPlan, ShardSet, Source};
use wick::rng::Rng;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const N: usize = 512;
const BATCH: usize = 64;

/// Smooth colour gradients with noise, so that JPEG decoding does realistic work.
fn make_folder(root: &Path) {
    for i in 0..N {
        let class = format!("c{}", i % 4);
        std::fs::create_dir_all(root.join(&class)).unwrap();
        let mut rng = Rng::keyed(7, "image-bench", i as u64);
        let (a, b) = (rng.next_f32() * 255.0, rng.next_f32() * 255.0);
        let img = image::RgbImage::from_fn(128, 128, |x, y| {
            let n = rng.next_f32() * 40.0;
            image::Rgb([
                ((x as f32 * 2.0 + a + n) % 256.0) as u8,
                ((y as f32 * 2.0 + b + n) % 256.0) as u8,
                (((x + y) as f32 + n) % 256.0) as u8,
            ])
        });
        img.save(root.join(&class).join(format!("{i:04}.jpg")))
            .unwrap();
    }
}

fn pipeline(c: &mut Criterion) {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/image-bench");
    let shards = base.join("shards");
    if !shards.join("manifest.json").is_file() {
        let _ = std::fs::remove_dir_all(&base);
        make_folder(&base.join("folder"));
        pack_image_folder(&base.join("folder"), &shards, None, 64 << 20, &|_, _| ()).unwrap();
    }
    let cfg = ImageConfig {
        resize: Some([72, 72]),
        crop: Some([64, 64]),
        random_crop: true,
        hflip: true,
        ..ImageConfig::default()
    };
    let src = ImageSource::new(
        ShardSet::open(&shards, true).unwrap(),
        "image",
        "label",
        cfg,
    )
    .unwrap();
    let device = candle_core::Device::Cpu;
    let mut g = c.benchmark_group("image_pipeline");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut step = 0usize;
        g.bench_function(
            format!("jpeg128_resize72_crop64_flip_norm_b64_threads{threads}"),
            |b| {
                b.iter(|| {
                    let epoch = (step * BATCH / N) as u64;
                    let plan = BatchPlan::shuffled(N, BATCH, true, 0, epoch);
                    let i = step % plan.len();
                    step += 1;
                    pool.install(|| {
                        src.gather_augmented(
                            plan.indices(i),
                            Some(Augment { seed: 0, epoch }),
                            &device,
                        )
                        .unwrap()
                    })
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
