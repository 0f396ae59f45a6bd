//! BERT-family encoders for sequence classification and sentence embeddings, with Hugging
//! Face's parameter names (`embeddings.*`, `encoder.layer.N.*`, `pooler.*`) plus a new
//! `classifier.*` head, so that `BertModel` and `BertForSequenceClassification` checkpoints
//! load unchanged.
//!
//! Every parameter lives in the seeded [`ParamStore`], so the whole encoder can be fine-tuned.
//! Dropout is real and seeded (candle-transformers' is a no-op). The hot paths are wick custom
//! ops: a fused linear layer, layer norm with a backward pass, and fused multi-head attention
//! that never materialises the score tensor. Frozen parts ([`BertFreeze`]) are read detached
//! and run in evaluation mode; with the whole encoder frozen, the trainer caches the pooled
//! embeddings once ([`Model::cached_features`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor, D};
use candle_nn::Init;
use serde::Deserialize;

use super::attention::{attention, AttentionSpec};
use super::layer_norm::layer_norm;
use super::linear::linear;
use super::packed_linear::PackedLinear;
use super::{Model, ModelCtx, ParamStore};
use crate::quant::Act;
use crate::{Error, Result};

/// The fields of a Hugging Face `config.json` that a BERT encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f32 {
    0.1
}

impl BertConfig {
    /// Reads and checks `config.json`: a BERT-family encoder with absolute positions and a GELU.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "{}: cannot read the model's config.json ({e}); model.pretrained must be a Hugging Face model directory (config.json, tokenizer.json, model.safetensors) or hf:OWNER/NAME",
                path.display()
            ))
        })?;
        let kind: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))?;
        let model_type = kind
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model_type != "bert" {
            return Err(Error::Config(format!(
                "{}: model_type = {model_type:?}, but model.kind = \"bert\" needs a BERT encoder (model_type \"bert\", e.g. sentence-transformers/all-MiniLM-L6-v2 or bert-base-uncased)",
                path.display()
            )));
        }
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: not a BERT config: {e}", path.display())))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                cfg.hidden_size,
                cfg.num_attention_heads
            )));
        }
        if !matches!(
            cfg.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(Error::Config(format!(
                "{}: hidden_act = {:?} is not supported; expected \"gelu\", \"gelu_new\" or \"relu\"",
                path.display(),
                cfg.hidden_act
            )));
        }
        if let Some(p) = cfg.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(Error::Config(format!(
                    "{}: position_embedding_type = {p:?} is not supported; expected \"absolute\"",
                    path.display()
                )));
            }
        }
        Ok(cfg)
    }
}

/// How a sequence becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The `[CLS]` token through the pooler (dense + tanh), as `BertForSequenceClassification`.
    Cls,
    /// The mean of the token vectors under the attention mask, as sentence-transformers.
    Mean,
}

impl Pooling {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cls" => Some(Pooling::Cls),
            "mean" => Some(Pooling::Mean),
            _ => None,
        }
    }
}

/// Which parameters stay fixed during fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertFreeze {
    None,
    /// Everything but the classifier: only the head trains (on cached embeddings).
    Encoder,
    /// The embedding tables and their layer norm.
    Embeddings,
    /// The embeddings and the first N encoder layers.
    Layers(usize),
}

impl BertFreeze {
    /// `"none"`, `"encoder"`, `"embeddings"` or `"layers:N"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(BertFreeze::None),
            "encoder" => Some(BertFreeze::Encoder),
            "embeddings" => Some(BertFreeze::Embeddings),
            _ => s
                .strip_prefix("layers:")?
                .parse()
                .ok()
                .map(BertFreeze::Layers),
        }
    }

    /// Whether parameter `name` is frozen.
    pub fn frozen(&self, name: &str) -> bool {
        match *self {
            BertFreeze::None => false,
            BertFreeze::Encoder => !name.starts_with("classifier."),
            BertFreeze::Embeddings => name.starts_with("embeddings."),
            BertFreeze::Layers(n) => {
                name.starts_with("embeddings.") || layer_index(name).is_some_and(|k| k < n)
            }
        }
    }
}

/// `N` of a parameter `encoder.layer.N.*`.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layer.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Options of a classifier on top of the encoder.
#[derive(Debug, Clone)]
pub struct BertOptions {
    /// Output classes; 0 builds the encoder alone (for embeddings).
    pub num_classes: usize,
    pub pooling: Pooling,
    pub freeze: BertFreeze,
    pub classifier_dropout: f32,
}

/// A BERT encoder with a pooler and an optional classification head.
pub struct Bert {
    store: ParamStore,
    pub config: BertConfig,
    pub options: BertOptions,
}

/// The files of a Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: PathBuf,
}

impl ModelFiles {
    /// The config, tokenizer and weights of a model directory or `hf:OWNER/NAME`.
    pub fn locate(spec: &str) -> Result<Self> {
        let dir = match spec.strip_prefix("hf:") {
            Some(repo) => super::pretrained::hub_dir(repo, &["config.json", "tokenizer.json"])?,
            None => PathBuf::from(spec),
        };
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "model.pretrained = {spec:?}: not a directory; a BERT needs a Hugging Face model directory (config.json, tokenizer.json, model.safetensors or pytorch_model.bin) or hf:OWNER/NAME"
            )));
        }
        let tokenizer = dir.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(Error::Config(format!(
                "{}: missing tokenizer.json; save the tokenizer there (tokenizer.save_pretrained(dir) in Python) or set data.tokenizer",
                dir.display()
            )));
        }
        let weights = super::pretrained::WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: no model.safetensors or pytorch_model.bin in the model directory",
                    dir.display()
                ))
            })?;
        Ok(Self {
            config: dir.join("config.json"),
            tokenizer,
            weights,
            dir,
        })
    }
}

impl Bert {
    /// Builds the encoder (and head) in `store`, initialised as Hugging Face does (normal with
    /// std 0.02, layer norms at 1 and 0), and marks the frozen parameters.
    pub fn new(store: ParamStore, config: BertConfig, options: BertOptions) -> Result<Self> {
        Self::build(store, config, options, &|_| false)
    }

    /// [`Self::new`], then [`Self::load_weights`] from `weights`. The weights that the
    /// checkpoint provides start at zero instead of a normal draw that loading would overwrite
    /// (22.7M values for MiniLM, half of `wick embed`'s start-up); every draw is keyed by its
    /// parameter's name, so the others (the classifier, a missing pooler) get the values that
    /// [`Self::new`] gives them.
    pub fn pretrained(
        store: ParamStore,
        config: BertConfig,
        options: BertOptions,
        origin: &str,
        weights: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let names = Self::checkpoint_names(weights);
        let loads = Self::loads(options.pooling, &names);
        let bert = Self::build(store, config, options, &|n| {
            names.contains_key(n) && loads(n)
        })?;
        bert.load_weights(origin, weights)?;
        Ok(bert)
    }

    /// A checkpoint's tensors under the names the store uses (a `bert.` prefix stripped,
    /// `position_ids` buffers left out).
    fn checkpoint_names(
        weights: &std::collections::BTreeMap<String, Tensor>,
    ) -> std::collections::BTreeMap<String, Tensor> {
        weights
            .iter()
            .filter(|(k, _)| !k.ends_with("position_ids"))
            .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(k).to_string(), v.clone()))
            .collect()
    }

    /// Which of the checkpoint's names are loaded: not the classifier (always new), and the
    /// pooler only with CLS pooling when the checkpoint has one.
    fn loads(
        pooling: Pooling,
        weights: &std::collections::BTreeMap<String, Tensor>,
    ) -> impl Fn(&str) -> bool {
        let has_pooler = weights.contains_key("pooler.dense.weight");
        let cls = pooling == Pooling::Cls;
        move |n: &str| {
            !(n.starts_with("classifier.")
                || n.starts_with("cls.")
                || (n.starts_with("pooler.") && (!cls || !has_pooler)))
        }
    }

    /// [`Self::new`], with the weights `provided` names (to be loaded next) set to zero.
    fn build(
        store: ParamStore,
        config: BertConfig,
        options: BertOptions,
        provided: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let vb = store.var_builder();
        let normal = |name: &str| {
            if provided(name) {
                Init::Const(0.0)
            } else {
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                }
            }
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let dense = |name: &str, out: usize, inp: usize| -> Result<()> {
            let w = format!("{name}.weight");
            vb.get_with_hints((out, inp), &w, normal(&w))?;
            vb.get_with_hints(out, &format!("{name}.bias"), Init::Const(0.0))?;
            Ok(())
        };
        let norm = |name: &str| -> Result<()> {
            vb.get_with_hints(h, &format!("{name}.weight"), Init::Const(1.0))?;
            vb.get_with_hints(h, &format!("{name}.bias"), Init::Const(0.0))?;
            Ok(())
        };
        for (rows, name) in [
            (config.vocab_size, "embeddings.word_embeddings.weight"),
            (
                config.max_position_embeddings,
                "embeddings.position_embeddings.weight",
            ),
            (
                config.type_vocab_size,
                "embeddings.token_type_embeddings.weight",
            ),
        ] {
            vb.get_with_hints((rows, h), name, normal(name))?;
        }
        norm("embeddings.LayerNorm")?;
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for part in ["query", "key", "value"] {
                dense(&format!("{p}.attention.self.{part}"), h, h)?;
            }
            dense(&format!("{p}.attention.output.dense"), h, h)?;
            norm(&format!("{p}.attention.output.LayerNorm"))?;
            dense(&format!("{p}.intermediate.dense"), i, h)?;
            dense(&format!("{p}.output.dense"), h, i)?;
            norm(&format!("{p}.output.LayerNorm"))?;
        }
        if options.pooling == Pooling::Cls {
            dense("pooler.dense", h, h)?;
        }
        if options.num_classes > 0 {
            dense("classifier", options.num_classes, h)?;
        }
        if let BertFreeze::Layers(n) = options.freeze {
            if n > config.num_hidden_layers {
                return Err(Error::Config(format!(
                    "model.freeze = \"layers:{n}\": the encoder has only {} layers",
                    config.num_hidden_layers
                )));
            }
        }
        for p in store.params() {
            store.set_trainable(&p.name, !options.freeze.frozen(&p.name));
        }
        Ok(Self {
            store,
            config,
            options,
        })
    }

    /// Loads pretrained weights (a `BertModel` or `BertForSequenceClassification` state dict:
    /// a `bert.` prefix is stripped). The classifier is always new; a missing pooler keeps its
    /// initialisation. Any other mismatch is one error listing every name.
    pub fn load_weights(
        &self,
        origin: &str,
        weights: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let weights = Self::checkpoint_names(weights);
        let loads = Self::loads(self.options.pooling, &weights);
        self.store.load_map(origin, &weights, &|n| !loads(n))
    }

    /// The variable `name`, detached when it is frozen or when no gradient is wanted (`grad`
    /// false: evaluation, so that no op keeps its inputs alive for a backward pass).
    fn t(&self, name: &str, grad: bool) -> candle_core::Result<Tensor> {
        let v = self
            .store
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("bert: no parameter `{name}`")))?;
        Ok(if grad && self.store.is_trainable(name) {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        })
    }

    fn dense(&self, name: &str, x: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        self.dense_then(name, x, grad, false, None)
    }

    /// `name`'s linear layer on `x` (int8 when quantized), then GELU if `gelu`, then
    /// `+ residual`. With f32 weights packed for inference ([`Self::packed`]), both happen in
    /// the kernel's epilogue, on each tile while it is in cache; otherwise they are separate
    /// ops. Same values either way.
    fn dense_then(
        &self,
        name: &str,
        x: &Tensor,
        grad: bool,
        gelu: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let b = self.t(&format!("{name}.bias"), grad)?;
        let wname = format!("{name}.weight");
        if let Some(q) = self.store.quantized(&wname) {
            let act = if gelu { Act::Gelu } else { Act::None };
            // With a gradient, the residual stays a candle op, so that it reaches the branch.
            let fused = if grad { None } else { residual };
            let y = crate::quant::linear_fused(x, &q, Some(&b), act, fused)?;
            return match (grad, residual) {
                (true, Some(r)) => y + r,
                _ => Ok(y),
            };
        }
        let mut fused = false;
        let mut y = crate::quant::linear_or(&self.store, &wname, x, Some(&b), || {
            if let Some(p) = self.packed(&[name], x, grad)? {
                fused = true;
                return p.apply_with(x, gelu, residual);
            }
            linear(x, &self.t(&wname, grad)?, &b)
        })?;
        if fused {
            return Ok(y);
        }
        if gelu {
            y = super::act::gelu(&y)?;
        }
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// `name`'s linear layer on `x`, dropout `p`, then `+ residual`: one fused product when
    /// there is no dropout ([`Self::dense_then`]).
    fn dense_dropout_add(
        &self,
        name: &str,
        x: &Tensor,
        residual: &Tensor,
        grad: bool,
        p: f32,
        ctx: &mut ModelCtx,
    ) -> candle_core::Result<Tensor> {
        if p > 0.0 {
            let y = self.dense(name, x, grad)?;
            return ctx.dropout(&y, p)? + residual;
        }
        self.dense_then(name, x, grad, false, Some(residual))
    }

    /// `name`'s linear layer on `x`, dropout `p`, `+ residual`, then layer norm `norm`: one
    /// fused product when the weights are packed for inference and there is no dropout (the
    /// norm runs on each block of rows while it is in cache); else separate ops. Same values.
    #[allow(clippy::too_many_arguments)]
    fn dense_add_norm(
        &self,
        name: &str,
        x: &Tensor,
        residual: &Tensor,
        norm: &str,
        grad: bool,
        p: f32,
        ctx: &mut ModelCtx,
    ) -> candle_core::Result<Tensor> {
        let wname = format!("{name}.weight");
        if p == 0.0 && self.store.quantized(&wname).is_none() {
            if let Some(packed) = self.packed(&[name], x, grad)? {
                self.store.observe(&wname, x)?;
                let w = self.t(&format!("{norm}.weight"), grad)?;
                let b = self.t(&format!("{norm}.bias"), grad)?;
                let ln = (&w, &b, self.config.layer_norm_eps);
                return packed.apply_norm(x, false, Some(residual), Some(ln));
            }
        }
        let y = self.dense_dropout_add(name, x, residual, grad, p, ctx)?;
        self.norm(norm, &y, grad)
    }

    /// The frozen layers `names` (prefixes of `.weight` and `.bias`; several are stacked by
    /// output, as query, key and value) with their weights packed for inference, made once and
    /// kept by the store (under the first weight's name) until its values change. `None` when
    /// a gradient is wanted, a layer trains, the CPU lacks the kernel, or `x` has too few
    /// rows ([`super::packed_linear::worth_it`]).
    fn packed(
        &self,
        names: &[&str],
        x: &Tensor,
        grad: bool,
    ) -> candle_core::Result<Option<Arc<PackedLinear>>> {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        if grad || !super::packed_linear::enabled() || !super::packed_linear::worth_it(rows) {
            return Ok(None);
        }
        // `derived` checks that the first weight is frozen, and forgets what it made whenever
        // freezing changes; the other parameters are checked once, when it is made.
        self.store.derived(&format!("{}.weight", names[0]), |_| {
            let frozen = |n: String| self.store.get(&n).is_some() && !self.store.is_trainable(&n);
            if !names
                .iter()
                .all(|n| frozen(format!("{n}.weight")) && frozen(format!("{n}.bias")))
            {
                return Ok(None);
            }
            let (mut w, mut b, mut k) = (Vec::new(), Vec::new(), 0);
            for n in names {
                let wt = self.t(&format!("{n}.weight"), false)?;
                k = wt.dims2()?.1;
                w.extend(wt.flatten_all()?.to_vec1::<f32>()?);
                b.extend(self.t(&format!("{n}.bias"), false)?.to_vec1::<f32>()?);
            }
            Ok(PackedLinear::new(&w, b.len(), k, Some(&b)))
        })
    }

    /// Rows `ids` of embedding table `name` (`[ids, H]`), int8 when quantized.
    fn lookup(&self, name: &str, ids: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        match self.store.quantized(name) {
            Some(q) => crate::quant::embedding(ids, &q),
            None => self.t(name, grad)?.index_select(ids, 0),
        }
    }

    /// Layer prefix `p`'s query, key and value weights stacked in one int8 tensor (rows keep
    /// their scales), built once; `None` unless all three are quantized.
    fn qkv_int8(&self, p: &str) -> candle_core::Result<Option<Arc<crate::quant::QTensor>>> {
        let name = |part: &str| format!("{p}.attention.self.{part}.weight");
        let [Some(q), Some(k), Some(v)] =
            ["query", "key", "value"].map(|part| self.store.quantized(&name(part)))
        else {
            return Ok(None);
        };
        let fused = name("qkv");
        if let Some(f) = self.store.quantized(&fused) {
            return Ok(Some(f));
        }
        let f = Arc::new(crate::quant::QTensor::stack(&fused, &[&q, &k, &v]));
        self.store
            .set_quantized(f.clone())
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(f))
    }

    /// Query, key and value of layer prefix `p` in one product `[.., 3H]`; `xq`: `x`'s int8
    /// rows, when the op before made them.
    fn qkv(
        &self,
        p: &str,
        x: &Tensor,
        xq: Option<crate::quant::gemm::QRows>,
        g: bool,
    ) -> candle_core::Result<Tensor> {
        let name = |part: &str, what: &str| format!("{p}.attention.self.{part}.{what}");
        let w = |part: &str, what: &str| self.t(&name(part, what), g);
        let bqkv = Tensor::cat(
            &[w("query", "bias")?, w("key", "bias")?, w("value", "bias")?],
            0,
        )?;
        if let Some(qt) = self.qkv_int8(p)? {
            let after = crate::quant::After::default();
            return Ok(crate::quant::linear_with(x, xq, &qt, Some(&bqkv), after)?.0);
        }
        let parts =
            ["query", "key", "value"].map(|part| self.store.quantized(&name(part, "weight")));
        if parts.iter().all(Option::is_none) {
            let names = ["query", "key", "value"].map(|part| format!("{p}.attention.self.{part}"));
            if let Some(packed) = self.packed(&names.each_ref().map(String::as_str), x, g)? {
                for n in &names {
                    self.store.observe(&format!("{n}.weight"), x)?;
                }
                return packed.apply(x);
            }
        }
        let mut ws = Vec::new();
        for (part, q) in ["query", "key", "value"].iter().zip(&parts) {
            let wname = name(part, "weight");
            ws.push(match q {
                Some(q) => Tensor::from_vec(q.dequantize(), q.shape.clone(), x.device())?,
                None => {
                    self.store.observe(&wname, x)?;
                    self.t(&wname, g)?
                }
            });
        }
        linear(x, &Tensor::cat(&ws, 0)?, &bqkv)
    }

    fn norm(&self, name: &str, x: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        layer_norm(
            x,
            &self.t(&format!("{name}.weight"), grad)?,
            &self.t(&format!("{name}.bias"), grad)?,
            self.config.layer_norm_eps,
        )
    }

    /// Whether the encoder runs in training mode (dropout on) for this call.
    fn encoder_trains(&self, ctx: &ModelCtx) -> bool {
        ctx.is_train() && self.options.freeze != BertFreeze::Encoder
    }

    /// The attention mask as f32 `[n, L]`: the batch's, else every non-padding token.
    fn mask_f32(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match mask {
            Some(m) => m.to_dtype(DType::F32),
            None => ids.ne(self.config.pad_token_id)?.to_dtype(DType::F32),
        }
    }

    /// Token vectors `[n, L, H]` for token ids `[n, L]` and the f32 mask.
    pub fn encode(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &mut ModelCtx,
    ) -> candle_core::Result<Tensor> {
        let (n, len) = ids.dims2()?;
        let c = &self.config;
        if len > c.max_position_embeddings {
            candle_core::bail!(
                "bert: sequences of {len} tokens exceed the model's {} positions; lower data.max_len",
                c.max_position_embeddings
            );
        }
        let train = self.encoder_trains(ctx);
        let g = ctx.is_train();
        let p_hidden = if train { c.hidden_dropout_prob } else { 0.0 };
        let ids = ids.to_dtype(DType::U32)?;
        let words = self
            .lookup("embeddings.word_embeddings.weight", &ids.flatten_all()?, g)?
            .reshape((n, len, c.hidden_size))?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let pos = self.lookup("embeddings.position_embeddings.weight", &positions, g)?;
        let types = self
            .t("embeddings.token_type_embeddings.weight", g)?
            .narrow(0, 0, 1)?;
        let x = words.broadcast_add(&(pos.broadcast_add(&types)?))?;
        let x = self.norm("embeddings.LayerNorm", &x, g)?;
        let mut x = ctx.dropout(&x, p_hidden)?;
        // int8: `x`'s rows quantized for the next query/key/value product, made by the op that
        // made `x` (while each row was in cache).
        let mut xq = None;
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let qkv = self.qkv(&p, &x, xq.take(), g)?;
            let seed = ctx.rng().next_u64();
            let a = attention(
                &qkv,
                mask,
                AttentionSpec {
                    heads: c.num_attention_heads,
                    dropout: if train {
                        c.attention_probs_dropout_prob
                    } else {
                        0.0
                    },
                    seed,
                },
            )?;
            let out = format!("{p}.attention.output.dense");
            let inter = format!("{p}.intermediate.dense");
            let output = format!("{p}.output.dense");
            // int8 without dropout or gradients: the feed-forward block as one op (below).
            let ffn = match (
                self.store.quantized(&format!("{inter}.weight")),
                self.store.quantized(&format!("{output}.weight")),
                c.hidden_act.as_str(),
            ) {
                (Some(q1), Some(q2), "gelu") if p_hidden == 0.0 && !g => Some((q1, q2)),
                _ => None,
            };
            let ln = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                Ok((
                    self.t(&format!("{name}.weight"), g)?,
                    self.t(&format!("{name}.bias"), g)?,
                ))
            };
            let norm1 = format!("{p}.attention.output.LayerNorm");
            let mut hq = None;
            x = match self.store.quantized(&format!("{out}.weight")) {
                // int8: the residual, the layer norm and the next product's int8 rows in the
                // product's pass.
                Some(q) if p_hidden == 0.0 && !g => {
                    let b = self.t(&format!("{out}.bias"), g)?;
                    let (w1, b1) = ln(&norm1)?;
                    let after = crate::quant::After {
                        residual: Some(&x),
                        norm: Some((&w1, &b1, c.layer_norm_eps)),
                        quantize_for: ffn.as_ref().map(|(q1, _)| &**q1),
                        ..Default::default()
                    };
                    let (y, q) = crate::quant::linear_with(&a, None, &q, Some(&b), after)?;
                    hq = q;
                    y
                }
                _ => self.dense_add_norm(&out, &a, &x, &norm1, g, p_hidden, ctx)?,
            };
            if let Some((q1, q2)) = ffn {
                // int8: both products in one op, the hidden layer never in f32 memory, then
                // the residual, the layer norm and the next layer's int8 rows.
                let b1 = self.t(&format!("{inter}.bias"), g)?;
                let b2 = self.t(&format!("{output}.bias"), g)?;
                let (w2, bn2) = ln(&format!("{p}.output.LayerNorm"))?;
                let next = match l + 1 < c.num_hidden_layers {
                    true => self.qkv_int8(&format!("encoder.layer.{}", l + 1))?,
                    false => None,
                };
                let after = crate::quant::After {
                    residual: Some(&x),
                    norm: Some((&w2, &bn2, c.layer_norm_eps)),
                    quantize_for: next.as_deref(),
                    ..Default::default()
                };
                let (y, q) = crate::quant::mlp_with(
                    &x,
                    hq,
                    &q1,
                    Some(&b1),
                    Act::Gelu,
                    &q2,
                    Some(&b2),
                    after,
                )?;
                (x, xq) = (y, q);
                continue;
            }
            let i = match (
                self.store.quantized(&format!("{inter}.weight")),
                c.hidden_act.as_str(),
            ) {
                // int8: GELU in the GEMM's epilogue.
                (Some(q), "gelu") => {
                    let b = self.t(&format!("{inter}.bias"), g)?;
                    crate::quant::linear_act(&x, &q, Some(&b), Act::Gelu)?
                }
                (_, "gelu") => self.dense_then(&inter, &x, g, true, None)?,
                _ => {
                    let i = self.dense(&inter, &x, g)?;
                    match c.hidden_act.as_str() {
                        "relu" => super::act::relu(&i)?,
                        _ => i.gelu()?,
                    }
                }
            };
            let norm2 = format!("{p}.output.LayerNorm");
            x = self.dense_add_norm(&output, &i, &x, &norm2, g, p_hidden, ctx)?;
        }
        Ok(x)
    }

    /// One vector `[n, H]` per sequence, by the configured pooling.
    pub fn pool(&self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        match self.options.pooling {
            Pooling::Cls => {
                let cls = hidden.i((.., 0, ..))?.contiguous()?;
                self.dense("pooler.dense", &cls, hidden.track_op())?.tanh()
            }
            Pooling::Mean => mean_pool(hidden, mask),
        }
    }

    /// Pooled vectors of token ids `[n, L]` (evaluation mode).
    pub fn pooled(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let m = self.mask_f32(ids, mask)?;
        let h = self.encode(ids, &m, &mut ModelCtx::eval())?;
        self.pool(&h, &m)
    }

    /// Sentence embeddings as sentence-transformers computes them: the masked mean of the token
    /// vectors, L2-normalised.
    pub fn embed(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let m = self.mask_f32(ids, mask)?;
        let h = self.encode(ids, &m, &mut ModelCtx::eval())?;
        let e = mean_pool(&h, &m)?;
        let norm = e
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        e.broadcast_div(&norm)
    }

    /// The classifier on pooled vectors: dropout, then `classifier`.
    pub fn head(&self, pooled: &Tensor, ctx: &mut ModelCtx) -> candle_core::Result<Tensor> {
        let x = ctx.dropout(pooled, self.options.classifier_dropout)?;
        self.dense("classifier", &x, ctx.is_train())
    }
}

/// The mean of `hidden` (`[n, L, H]`) over the tokens where `mask` (`[n, L]`) is 1.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f32::MAX)?;
    sum.broadcast_div(&count)
}

impl Model for Bert {
    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn kind(&self) -> &str {
        "bert"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut ModelCtx) -> candle_core::Result<Tensor> {
        if ctx.features_cached() {
            return self.head(xs, ctx);
        }
        let m = self.mask_f32(xs, ctx.mask())?;
        let h = self.encode(xs, &m, ctx)?;
        let pooled = self.pool(&h, &m)?;
        self.head(&pooled, ctx)
    }

    fn eval_batch(&self) -> usize {
        // 64 sequences of 512 tokens of a BERT-base keep activations under 1 GB.
        64
    }

    fn cached_features(&self) -> Option<usize> {
        (self.options.freeze == BertFreeze::Encoder).then_some(self.config.hidden_size)
    }

    fn features(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.pooled(xs, mask)
    }

    fn quant_layers(&self) -> Vec<crate::quant::QuantLayer> {
        use crate::quant::QuantLayer;
        let mut v = vec![
            QuantLayer::embedding("embeddings.word_embeddings.weight"),
            QuantLayer::embedding("embeddings.position_embeddings.weight"),
        ];
        for l in 0..self.config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for part in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ] {
                v.push(QuantLayer::linear(format!("{p}.{part}.weight")));
            }
        }
        for head in ["pooler.dense.weight", "classifier.weight"] {
            if self.store.get(head).is_some() {
                v.push(QuantLayer::linear(head));
            }
        }
        v
    }
}

/// Sentence embeddings from a BERT-family model directory, as sentence-transformers computes
/// them (masked mean pooling, L2 normalisation), with the model's own tokenizer.
pub struct SentenceEncoder {
    pub bert: Bert,
    pub tokenizer: tokenizers::Tokenizer,
}

impl SentenceEncoder {
    /// Loads the encoder of `spec` (a model directory or `hf:OWNER/NAME`), truncating inputs to
    /// `max_len` tokens.
    pub fn load(spec: &str, max_len: usize) -> Result<Self> {
        let files = ModelFiles::locate(spec)?;
        let config = BertConfig::load(&files.config)?;
        let max_len = max_len.min(config.max_position_embeddings);
        let device = candle_core::Device::Cpu;
        let weights = super::pretrained::read_weights(&files.weights, &device)?;
        let bert = Bert::pretrained(
            ParamStore::new(0),
            config,
            BertOptions {
                num_classes: 0,
                pooling: Pooling::Mean,
                freeze: BertFreeze::Encoder,
                classifier_dropout: 0.0,
            },
            &files.weights.display().to_string(),
            &weights,
        )?;
        let tokenizer = crate::data::text::load_tokenizer(&files.tokenizer, max_len)?;
        Ok(Self { bert, tokenizer })
    }

    /// One unit-length embedding per text, computed as one padded batch.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let device = candle_core::Device::Cpu;
        let (ids, mask) = crate::data::text::encode_batch(&self.tokenizer, texts, &device)?;
        Ok(self.bert.embed(&ids, Some(&mask))?.to_vec2()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> BertConfig {
        serde_json::from_str(
            r#"{"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 12,
                "max_position_embeddings": 16}"#,
        )
        .unwrap()
    }

    fn options(pooling: Pooling) -> BertOptions {
        BertOptions {
            num_classes: 3,
            pooling,
            freeze: BertFreeze::None,
            classifier_dropout: 0.1,
        }
    }

    fn values(bert: &Bert) -> Vec<(String, Vec<f32>)> {
        bert.store
            .params()
            .into_iter()
            .map(|p| {
                let v = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                (p.name, v)
            })
            .collect()
    }

    #[test]
    fn pretrained_gives_new_then_load_weights_values() {
        // A checkpoint from another seed, as a BertForSequenceClassification saves it (a
        // `bert.` prefix, a classifier that is never loaded), without a pooler.
        let source = Bert::new(ParamStore::new(1), tiny(), options(Pooling::Mean)).unwrap();
        let weights: std::collections::BTreeMap<String, Tensor> = source
            .store
            .params()
            .into_iter()
            .map(|p| {
                let name = if p.name.starts_with("classifier.") {
                    p.name
                } else {
                    format!("bert.{}", p.name)
                };
                (name, p.var.as_tensor().clone())
            })
            .collect();
        for pooling in [Pooling::Mean, Pooling::Cls] {
            let slow = Bert::new(ParamStore::new(2), tiny(), options(pooling)).unwrap();
            slow.load_weights("checkpoint", &weights).unwrap();
            let fast = Bert::pretrained(
                ParamStore::new(2),
                tiny(),
                options(pooling),
                "checkpoint",
                &weights,
            )
            .unwrap();
            let (a, b) = (values(&slow), values(&fast));
            assert_eq!(a, b, "{pooling:?} pooling");
            // The classifier (and, with CLS pooling, the missing pooler) kept seed 2's draws.
            let source = values(&source);
            let head = a.iter().find(|(n, _)| n == "classifier.weight").unwrap();
            assert_ne!(
                head,
                source
                    .iter()
                    .find(|(n, _)| n == "classifier.weight")
                    .unwrap()
            );
            assert!(head.1.iter().any(|&v| v != 0.0));
            if pooling == Pooling::Cls {
                assert!(a
                    .iter()
                    .any(|(n, v)| n == "pooler.dense.weight" && v.iter().any(|&x| x != 0.0)));
            }
        }
    }
}
