//! Text samples tokenized at load time: the `tokenizers` crate, with the tokenizer's own
//! padding replaced by padding to the longest sequence in the batch, and truncation to
//! `max_len`.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::shardset::ShardSet;
use super::source::Source;
use super::{Batch, Targets};
use crate::{Error, Result};

/// Loads `tokenizer.json`, pads batches to their longest sequence and truncates to `max_len`.
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::Data(format!(
            "{}: no tokenizer.json here; point data.tokenizer (or the model directory) at a Hugging Face tokenizer file",
            path.display()
        )));
    }
    let mut tok = Tokenizer::from_file(path).map_err(|e| {
        Error::Data(format!(
            "{}: not a valid tokenizer.json: {e}",
            path.display()
        ))
    })?;
    // Keep the file's pad token and id, but pad each batch only to its longest sequence.
    let pad = tok.get_padding().cloned().unwrap_or_default();
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..pad
    }));
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::Data(format!("{}: cannot set truncation: {e}", path.display())))?;
    Ok(tok)
}

/// Token ids `[n, L]` (u32) and the attention mask `[n, L]` (u32, 1 = token) of `texts`,
/// tokenized in parallel and padded to the longest (at most the tokenizer's truncation length).
pub fn encode_batch(tok: &Tokenizer, texts: &[&str], device: &Device) -> Result<(Tensor, Tensor)> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| Error::Data(format!("tokenization failed: {e}")))?;
    let n = texts.len();
    let l = enc.first().map(|e| e.get_ids().len()).unwrap_or(0);
    let ids: Vec<u32> = enc
        .iter()
        .flat_map(|e| e.get_ids().iter().copied())
        .collect();
    let mask: Vec<u32> = enc
        .iter()
        .flat_map(|e| e.get_attention_mask().iter().copied())
        .collect();
    Ok((
        Tensor::from_vec(ids, (n, l), device)?,
        Tensor::from_vec(mask, (n, l), device)?,
    ))
}

/// Labelled raw text from shards, tokenized per batch (the tokenizer encodes the batch's texts
/// in parallel). A batch holds token ids `[n, L]` in `x`, the attention mask, and the labels,
/// where `L` is the longest sequence in the batch (at most `max_len`).
pub struct TextSource {
    pub set: ShardSet,
    text: usize,
    label: usize,
    tokenizer: Tokenizer,
}

impl TextSource {
    pub fn new(set: ShardSet, text: &str, label: &str, tokenizer: Tokenizer) -> Result<Self> {
        let dir = set.dir.display().to_string();
        let text = set
            .field_index(text)
            .ok_or_else(|| Error::Data(format!("{dir}: no text field `{text}`")))?;
        let label = set
            .field_index(label)
            .ok_or_else(|| Error::Data(format!("{dir}: no label field `{label}`")))?;
        Ok(Self {
            set,
            text,
            label,
            tokenizer,
        })
    }

    /// The text of sample `i`.
    pub fn text(&self, i: usize) -> Result<&str> {
        std::str::from_utf8(self.set.bytes(self.text, i)).map_err(|e| {
            Error::Data(format!(
                "{}: sample {i}: invalid UTF-8 at byte {}; the shard is corrupt",
                self.set.dir.display(),
                e.valid_up_to()
            ))
        })
    }
}

impl Source for TextSource {
    fn len(&self) -> usize {
        self.set.len()
    }

    fn gather(&self, idx: &[u32], device: &Device) -> Result<Batch> {
        let texts: Vec<&str> = idx
            .iter()
            .map(|&i| self.text(i as usize))
            .collect::<Result<_>>()?;
        let (x, mask) = encode_batch(&self.tokenizer, &texts, device)
            .map_err(|e| Error::Data(format!("{}: {e}", self.set.dir.display())))?;
        let n = idx.len();
        let y: Vec<u32> = idx
            .iter()
            .map(|&i| self.set.label(self.label, i as usize) as u32)
            .collect();
        Ok(Batch {
            x,
            y: Tensor::from_vec(y, n, device)?,
            n,
            mask: Some(mask),
        })
    }

    fn targets(&self) -> Result<Targets> {
        Ok(Targets::Classes(
            (0..self.len())
                .map(|i| self.set.label(self.label, i) as u32)
                .collect(),
        ))
    }

    fn blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        Some(self.set.blocks())
    }
}
