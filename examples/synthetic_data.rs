//! Writes a seeded synthetic shard dataset (`x`: f32 features, `label`: 0..classes), e.g. images
//! for throughput benchmarks: `cargo run --release --example synthetic_data -- DIR N DIM CLASSES`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 4 {
        return Err("usage: synthetic_data DIR N DIM CLASSES".into());
    }
    let m = wick::data::synthetic::ensure(
        std::path::Path::new(&a[0]),
        a[1].parse()?,
        a[2].parse()?,
        a[3].parse()?,
        64 << 20,
    )?;
    eprintln!("{}: {} samples", a[0], m.num_samples);
    Ok(())
}
