//! wick's side of `benches/compare/bert_infer.py`: all-MiniLM-L6-v2 forward time (median) at
//! batch 1 × 128 tokens and batch 32 × 128 tokens, on the same token ids as the PyTorch side.
//! Then quantizes the encoder to int8 (dynamic, `wick::quant::quantize`) and times it again.
//! Prints JSON: `{"f32": {"batch1_s": .., "batch32_s": ..}, "int8": {..}}` (`--no-int8`: f32
//! only; `--int8-only`: int8 only; `--ab-packed`: f32 with and without the packed-weight
//! linear kernel, alternating in one process, `--iters` rounds).
//!
//!     cargo run --release --example bert_infer -- [--threads 2] [--tokens 128] [--iters 5]

use std::time::Instant;

use wick::model::bert::SentenceEncoder;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TEXT: &str = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report on renewable energy, supply chains, interest rates and the weather in Lisbon. ";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    wick::alloc::keep_freed_memory();
    let (threads, tokens, iters) = (arg("--threads", 2), arg("--tokens", 128), arg("--iters", 5));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/checkpoints/pretrained/all-MiniLM-L6-v2"
    );
    let enc = SentenceEncoder::load(dir, tokens)?;
    let long = TEXT.repeat(20);
    let time = |batch: usize, iters: usize| -> anyhow::Result<f64> {
        let texts: Vec<&str> = (0..batch).map(|i| &long[i * 7..]).collect();
        let (ids, mask) =
            wick::data::text::encode_batch(&enc.tokenizer, &texts, &candle_core::Device::Cpu)?;
        anyhow::ensure!(ids.dims() == [batch, tokens], "inputs {:?}", ids.dims());
        let run = || enc.bert.pooled(&ids, Some(&mask));
        for _ in 0..2 {
            run()?;
        }
        let mut t = Vec::new();
        for _ in 0..iters {
            let s = Instant::now();
            run()?;
            t.push(s.elapsed().as_secs_f64());
        }
        Ok(median(t))
    };
    let mut out = serde_json::json!({});
    if std::env::args().any(|a| a == "--ab-packed") {
        // f32 with and without the packed-weight linear kernel, alternating in one process.
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..iters {
            for (flag, v) in [(true, &mut on), (false, &mut off)] {
                wick::model::packed_linear::set_enabled(flag);
                v.push((time(1, 5)?, time(32, 1)?));
            }
        }
        let stat = |v: &Vec<(f64, f64)>, f: fn(&(f64, f64)) -> f64| {
            let x: Vec<f64> = v.iter().map(f).collect();
            (
                median(x.clone()),
                x.iter().cloned().fold(f64::MAX, f64::min),
            )
        };
        for (name, v) in [("packed", &on), ("general", &off)] {
            let (b1m, b1b) = stat(v, |p| p.0);
            let (b32m, b32b) = stat(v, |p| p.1);
            println!(
                "{name}: batch1 median {:.2} ms best {:.2} ms; batch32 median {:.3} s best {:.3} s",
                b1m * 1e3,
                b1b * 1e3,
                b32m,
                b32b
            );
        }
        return Ok(());
    }
    if !std::env::args().any(|a| a == "--int8-only") {
        let b1 = time(1, iters * 5)?;
        let b32 = time(32, iters)?;
        out["f32"] = serde_json::json!({"batch1_s": b1, "batch32_s": b32});
    }
    if !std::env::args().any(|a| a == "--no-int8") {
        let cfg = wick::quant::QuantConfig::default();
        wick::quant::quantize(&enc.bert, &cfg, None)?;
        let b1 = time(1, iters * 5)?;
        let b32 = time(32, iters)?;
        out["int8"] = serde_json::json!({"batch1_s": b1, "batch32_s": b32});
    }
    println!("{out}");
    Ok(())
}
