//! Memory stays bounded: iterate one shuffled epoch over a synthetic shard set of N GB (f32
//! rows of 784) with the trainer's prefetching loader, and report the peak anonymous memory
//! (RssAnon: heap, not the page cache that backs the memory maps).
//!
//! `cargo run --release --example loader_memory -- prepare 4`, then `-- 4`; see
//! `benches/compare/loader_memory.sh`, which runs both.

use std::path::Path;
use std::time::Instant;

use wick::data::loader::with_prefetch;
use wick::data::{BatchPlan, ShardSet, ShardSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_anon_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prepare = args.first().is_some_and(|a| a == "prepare");
    let gb: f64 = args.last().map(String::as_str).unwrap_or("1").parse()?;
    let dim = 784;
    let n = (gb * 1e9 / (dim * 4 + 8) as f64) as usize;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/loader-mem/{gb}g"));
    if prepare {
        // Generating is a separate process, so its buffers do not count in the measurement.
        let t0 = Instant::now();
        wick::data::synthetic::ensure(&dir, n, dim, 10, 64 << 20)?;
        eprintln!(
            "{gb} GB dataset ready in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let base = rss_anon_kib();
    let src = ShardSource::new(ShardSet::open(&dir, false)?, "x", "label", None)?;
    let plan = BatchPlan::shuffled(n, 256, false, 0, 0);
    let device = candle_core::Device::Cpu;
    let t0 = Instant::now();
    let mut peak = rss_anon_kib();
    let mut checksum = 0f64;
    with_prefetch(
        &src,
        &plan,
        0..plan.len(),
        &device,
        4,
        |batches| -> anyhow::Result<()> {
            for (i, b) in batches {
                let b = b?;
                checksum += b.x.get(0)?.get(0)?.to_scalar::<f32>()? as f64;
                if i % 32 == 0 {
                    peak = peak.max(rss_anon_kib());
                }
            }
            Ok(())
        },
    )?;
    peak = peak.max(rss_anon_kib());
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "dataset_gb": gb,
            "samples": n,
            "shards": src.set.manifest.shards.len(),
            "rss_anon_before_mib": base as f64 / 1024.0,
            "peak_rss_anon_mib": peak as f64 / 1024.0,
            "epoch_s": secs,
            "samples_per_s": n as f64 / secs,
            "checksum": checksum,
        })
    );
    Ok(())
}
