//! all-MiniLM-L6-v2 forward pass (the encoder and mean pooling, evaluation mode), f32 and then
//! int8 (`wick::quant::quantize`, dynamic): latency at batch 1 × 128 tokens and throughput at
//! batch 32 × 128 tokens, on real text truncated to
//! exactly 128 tokens. Needs the model (scripts/fetch-minilm.sh). `benches/compare/run_bert.sh`
//! runs it beside PyTorch + transformers (`benches/compare/bert_infer.py`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wick::model::bert::SentenceEncoder;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TEXT: &str = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report on renewable energy, supply chains, interest rates and the weather in Lisbon. ";
const TOKENS: usize = 128;

fn bench(c: &mut Criterion) {
    wick::alloc::keep_freed_memory();
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/checkpoints/pretrained/all-MiniLM-L6-v2"
    );
    let enc = match SentenceEncoder::load(dir, TOKENS) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("bert_infer: {e}; run scripts/fetch-minilm.sh");
            return;
        }
    };
    let long = TEXT.repeat(20);
    let inputs: Vec<_> = [1usize, 32]
        .into_iter()
        .map(|batch| {
            let texts: Vec<&str> = (0..batch).map(|i| &long[i * 7..]).collect();
            let (ids, mask) =
                wick::data::text::encode_batch(&enc.tokenizer, &texts, &candle_core::Device::Cpu)
                    .unwrap();
            assert_eq!(ids.dims(), [batch, TOKENS]);
            (batch, ids, mask)
        })
        .collect();
    for (group, int8) in [
        ("minilm_forward_128_tokens", false),
        ("minilm_int8_forward_128_tokens", true),
    ] {
        if int8 {
            wick::quant::quantize(&enc.bert, &wick::quant::QuantConfig::default(), None).unwrap();
        }
        let mut g = c.benchmark_group(group);
        g.sample_size(10);
        for (batch, ids, mask) in &inputs {
            g.throughput(Throughput::Elements(*batch as u64));
            g.bench_function(format!("batch{batch}"), |b| {
                b.iter(|| enc.bert.pooled(ids, Some(mask)).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
