//! Pretrained weights from wherever users keep them: a safetensors file, a PyTorch
//! `.pth`/`.pt`/`.bin` state dict (torchvision's format), a previous wick run directory, or a
//! Hugging Face Hub repository (`hf:REPO`, through the hub cache).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::read_safetensors;
use crate::{Error, Result};

/// Weight files looked for, in order, in a hub repository or model directory.
pub const WEIGHT_FILES: [&str; 3] = ["model.safetensors", "pytorch_model.bin", "model.pth"];

/// Reads the weights named by `spec`; returns a description of where they came from (for
/// errors) and the tensors by state-dict name.
pub fn load(spec: &str, device: &Device) -> Result<(String, BTreeMap<String, Tensor>)> {
    let path = match spec.strip_prefix("hf:") {
        Some(repo) => hub_file(repo)?,
        None => local_file(Path::new(spec))?,
    };
    let tensors = read_weights(&path, device)?;
    Ok((path.display().to_string(), tensors))
}

/// A weights file, or the model of a wick run directory (its best checkpoint, else its last).
fn local_file(p: &Path) -> Result<PathBuf> {
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.join("config.toml").is_file() {
        if let Ok(d) = crate::train::checkpoint::locate_in_run(p, "best") {
            return Ok(d.join(crate::train::checkpoint::MODEL_FILE));
        }
        return Err(Error::Checkpoint(format!(
            "{}: the run has no checkpoint yet; train it first (wick train) or point model.pretrained at a weights file",
            p.display()
        )));
    }
    for f in WEIGHT_FILES {
        if p.join(f).is_file() {
            return Ok(p.join(f));
        }
    }
    Err(Error::Config(format!(
        "model.pretrained = \"{}\": not a weights file, a model directory or a wick run directory",
        p.display()
    )))
}

/// A safetensors file or a PyTorch pickle (`.pth`, `.pt`, `.bin`), by content.
pub fn read_weights(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // A zip archive (PyTorch ≥ 1.6) or a legacy pickle (starts with the PROTO opcode 0x80).
    let is_torch = bytes.starts_with(b"PK\x03\x04") || bytes.first() == Some(&0x80);
    let tensors = if is_torch {
        let named = candle_core::pickle::read_all(path).map_err(|e| {
            Error::Checkpoint(format!(
                "{}: cannot read the PyTorch checkpoint ({e}); save a state dict with torch.save(model.state_dict(), path) or convert it to safetensors",
                path.display()
            ))
        })?;
        let mut out = BTreeMap::new();
        for (name, t) in named {
            out.insert(name, t.to_device(device)?);
        }
        out
    } else {
        read_safetensors(path, &bytes, device)?
    };
    // Models saved from DataParallel/DDP prefix every name with `module.`.
    let strip = !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module."));
    Ok(if strip {
        tensors
            .into_iter()
            .map(|(k, v)| (k["module.".len()..].to_string(), v))
            .collect()
    } else {
        tensors
    })
}

/// The weights file of hub repository `repo`, from the local hub cache (`HF_HUB_CACHE`,
/// `HF_HOME/hub` or `~/.cache/huggingface/hub`) or, when absent, downloaded into it.
fn hub_file(repo: &str) -> Result<PathBuf> {
    hub_get(repo, &[])
}

/// The snapshot directory of hub repository `repo` holding a weights file and every file of
/// `also` (e.g. `config.json`, `tokenizer.json`), from the hub cache or downloaded into it.
pub fn hub_dir(repo: &str, also: &[&str]) -> Result<PathBuf> {
    let weights = hub_get(repo, also)?;
    Ok(weights.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn hub_get(repo: &str, also: &[&str]) -> Result<PathBuf> {
    if repo.is_empty() || repo.contains(char::is_whitespace) {
        return Err(Error::Config(format!(
            "model.pretrained = \"hf:{repo}\": expected hf:OWNER/NAME, e.g. hf:timm/resnet18.a1_in1k"
        )));
    }
    // Hugging Face's conventions: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(dir.into()),
        None => hf_hub::Cache::from_env(),
    };
    let cached = cache.model(repo.to_string());
    let extras_cached = also.iter().all(|f| cached.get(f).is_some());
    if extras_cached {
        for f in WEIGHT_FILES {
            if let Some(p) = cached.get(f) {
                return Ok(p);
            }
        }
    }
    let wanted = || {
        let mut w: Vec<&str> = also.to_vec();
        w.push("model.safetensors / pytorch_model.bin");
        w.join(", ")
    };
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true") {
        return Err(Error::Config(format!(
            "hf:{repo}: the hub cache at {} lacks {} and HF_HUB_OFFLINE is set; download it first or unset HF_HUB_OFFLINE",
            cache.path().display(),
            wanted()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build()
        .map_err(|e| Error::Config(format!("hf:{repo}: cannot start the hub client: {e}")))?;
    let remote = api.model(repo.to_string());
    let fail = |e: String| {
        Error::Config(format!(
            "hf:{repo}: {} not in the local hub cache and the download failed ({e}); check the repository name and the network, or download the files and set model.pretrained to their directory",
            wanted()
        ))
    };
    for f in also {
        remote.get(f).map_err(|e| fail(e.to_string()))?;
    }
    let mut last = String::new();
    for f in WEIGHT_FILES {
        match remote.get(f) {
            Ok(p) => return Ok(p),
            Err(e) => last = e.to_string(),
        }
    }
    Err(fail(last))
}
