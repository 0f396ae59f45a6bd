//! `wick embed`.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A BERT-family model directory (config.json, tokenizer.json, model.safetensors) or
    /// hf:OWNER/NAME.
    pub model: String,
    /// A text to embed; repeatable.
    #[arg(long, value_name = "TEXT", required_unless_present = "input")]
    pub text: Vec<String>,
    /// A file of texts: one per line, or JSON lines / CSV with a `text` field.
    #[arg(long, value_name = "FILE", conflicts_with = "text")]
    pub input: Option<PathBuf>,
    /// Truncate texts to this many tokens (default: the model's max_seq_length, else 512).
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
}

/// Prints one JSON line per text: `{"text": …, "embedding": […]}`; the time goes to stderr.
pub fn run(a: EmbedArgs) -> anyhow::Result<()> {
    let texts = match &a.input {
        Some(f) => super::read_texts(f)?,
        None => a.text.clone(),
    };
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        anyhow::bail!("text {}: the text is empty", i + 1);
    }
    let max_len = a
        .max_len
        .unwrap_or_else(|| sentence_max_len(&a.model).unwrap_or(512));
    let enc = crate::model::bert::SentenceEncoder::load(&a.model, max_len)?;
    let t0 = std::time::Instant::now();
    let mut n = 0;
    for chunk in texts.chunks(32) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for (text, e) in chunk.iter().zip(enc.embed(&refs)?) {
            println!("{}", serde_json::json!({"text": text, "embedding": e}));
            n += 1;
        }
    }
    eprintln!(
        "{n} embeddings in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// sentence-transformers' `max_seq_length` (sentence_bert_config.json) of a local model.
fn sentence_max_len(model: &str) -> Option<usize> {
    let text =
        std::fs::read_to_string(PathBuf::from(model).join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|n| n as usize)
}
