//! BERT: embedding parity with all-MiniLM-L6-v2 as published, fine-tuning and the frozen
//! encoder on SpamAssassin, and errors on bad input.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn minilm() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints/pretrained/all-MiniLM-L6-v2");
    require_asset(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 (scripts/fetch-minilm.sh)",
    )
    .then_some(dir)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_embeddings_match_the_published_values_in_a_padded_batch() {
    let Some(dir) = minilm() else { return };
    let enc = wick::model::bert::SentenceEncoder::load(dir.to_str().unwrap(), 128).unwrap();
    // One batch: the short sentence is padded to the longest.
    let texts = [
        "The cat sits outside",
        "A man is eating food.",
        "A man is eating a piece of bread.",
    ];
    let e = enc.embed(&texts).unwrap();
    let want = [
        0.13919106f32,
        0.003029111,
        0.047014732,
        0.03957378,
        -0.047998514,
        -0.0068115355,
    ];
    for (i, (&got, &w)) in e[0].iter().zip(&want).enumerate() {
        assert!(
            (got - w).abs() < 1e-5,
            "value {i}: {got} vs {w}; {:?}",
            &e[0][..6]
        );
    }
    let c = cosine(&e[1], &e[2]);
    assert!((c - 0.7553).abs() <= 0.001, "cosine {c}");
    // Alone (no padding) the embedding is the same.
    let alone = enc.embed(&texts[..1]).unwrap();
    for (a, b) in alone[0].iter().zip(&e[0]) {
        assert!((a - b).abs() < 1e-5);
    }
    let norm: f32 = e[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}
