//! A trainable ResNet (18, 34, 50) with torchvision's parameter names, on NHWC activations
//! through wick's convolution, batch-norm and pooling ops.
//!
//! The backbone can be frozen in whole or in part ([`Freeze`]): frozen parameters are read
//! detached (no gradient, no optimizer state) and frozen BatchNorm layers run in evaluation
//! mode. With the whole backbone frozen, the trainer computes the pooled features once per
//! sample and trains the head on that cache ([`Model::cached_features`]).

use candle_core::{Module, Tensor};
use candle_nn::{Init, Linear};

use super::batchnorm::BatchNorm2d;
use super::conv::{conv2d, ConvSpec};
use super::pool::{global_avg_pool, max_pool2d, PoolSpec};
use super::{Model, ModelCtx, ParamStore};
use crate::config::ResnetArch;
use crate::Result;

/// Which parameters stay fixed during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    None,
    /// Everything but the head (`fc*`).
    Backbone,
    /// The stem and stages 1..=N.
    Until(usize),
}

impl Freeze {
    /// `"none"`, `"backbone"` or `"until:layerN"` (N in 1..=4).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Freeze::None),
            "backbone" => Some(Freeze::Backbone),
            _ => {
                let n: usize = s.strip_prefix("until:layer")?.parse().ok()?;
                (1..=4).contains(&n).then_some(Freeze::Until(n))
            }
        }
    }

    /// Whether parameter `name` is frozen.
    pub fn frozen(&self, name: &str) -> bool {
        match *self {
            Freeze::None => false,
            Freeze::Backbone => !name.starts_with("fc."),
            Freeze::Until(n) => {
                if name.starts_with("conv1.") || name.starts_with("bn1.") {
                    return true;
                }
                name.strip_prefix("layer")
                    .and_then(|r| r.split('.').next())
                    .and_then(|d| d.parse::<usize>().ok())
                    .is_some_and(|k| k <= n)
            }
        }
    }
}

/// The stem convolution: 7×7, stride 2, padding 3.
pub(crate) const STEM: ConvSpec = ConvSpec {
    stride: 2,
    padding: 3,
    dilation: 1,
    groups: 1,
};

/// A convolution followed by batch norm, by parameter prefix.
#[derive(Debug, Clone)]
pub(crate) struct ConvBn {
    pub conv: String,
    pub bn: String,
    pub spec: ConvSpec,
}

/// A residual block: its layers and the shortcut's projection, if any.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    /// `conv1/bn1`, `conv2/bn2` (and `conv3/bn3` for a bottleneck).
    pub layers: Vec<ConvBn>,
    pub downsample: Option<ConvBn>,
}

/// The options of [`ResNet::new`].
#[derive(Debug, Clone)]
pub struct ResNetConfig {
    pub arch: ResnetArch,
    /// Channels of the first stage (torchvision: 64).
    pub width: usize,
    pub num_classes: usize,
    /// Channels of the stem convolution (1 or 3).
    pub in_channels: usize,
    /// `[channels, height, width]` of an input sample.
    pub input_shape: [usize; 3],
    pub head_hidden: Option<usize>,
    pub dropout: f32,
    pub freeze: Freeze,
    /// Stages of the backbone to use (1..=4, torchvision: 4). Fewer stages cut the network
    /// after `layer{stages}`: earlier features are often more general for transfer.
    pub stages: usize,
}

/// A ResNet classifier.
pub struct ResNet {
    store: ParamStore,
    cfg: ResNetConfig,
    blocks: Vec<Block>,
    features: usize,
}

impl ResNet {
    /// Builds the network in `store` (parameters initialised as torchvision does, from the
    /// store's seed) and marks the frozen ones.
    pub fn new(store: ParamStore, cfg: ResNetConfig) -> Result<Self> {
        let vb = store.var_builder();
        let (depths, bottleneck): ([usize; 4], bool) = match cfg.arch {
            ResnetArch::Resnet18 => ([2, 2, 2, 2], false),
            ResnetArch::Resnet34 => ([3, 4, 6, 3], false),
            ResnetArch::Resnet50 => ([3, 4, 6, 3], true),
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let conv_init = Init::Kaiming {
            dist: candle_nn::init::NormalOrUniform::Normal,
            fan: candle_nn::init::FanInOut::FanOut,
            non_linearity: candle_nn::init::NonLinearity::ReLU,
        };
        let conv = |name: &str, cout: usize, cin: usize, k: usize| -> Result<()> {
            vb.get_with_hints((cout, cin, k, k), &format!("{name}.weight"), conv_init)?;
            Ok(())
        };
        let bn = |name: &str, c: usize| -> Result<()> {
            vb.get_with_hints(c, &format!("{name}.weight"), Init::Const(1.0))?;
            vb.get_with_hints(c, &format!("{name}.bias"), Init::Const(0.0))?;
            store.buffer(&format!("{name}.running_mean"), c, 0.0)?;
            store.buffer(&format!("{name}.running_var"), c, 1.0)?;
            store.buffer(&format!("{name}.num_batches_tracked"), (), 0.0)?;
            Ok(())
        };
        let w = cfg.width;
        conv("conv1", w, cfg.in_channels, 7)?;
        bn("bn1", w)?;
        let mut blocks = Vec::new();
        let mut cin = w;
        for (stage, &depth) in depths.iter().enumerate().take(cfg.stages) {
            let planes = w << stage;
            for i in 0..depth {
                let p = format!("layer{}.{i}", stage + 1);
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let cout = planes * expansion;
                let spec = |k: usize, s: usize| ConvSpec {
                    stride: s,
                    padding: k / 2,
                    ..Default::default()
                };
                let cb = |j: usize, s: ConvSpec| ConvBn {
                    conv: format!("{p}.conv{j}"),
                    bn: format!("{p}.bn{j}"),
                    spec: s,
                };
                let mut layers = Vec::new();
                if bottleneck {
                    // torchvision (v1.5): the stride is on the 3×3 convolution.
                    conv(&format!("{p}.conv1"), planes, cin, 1)?;
                    bn(&format!("{p}.bn1"), planes)?;
                    conv(&format!("{p}.conv2"), planes, planes, 3)?;
                    bn(&format!("{p}.bn2"), planes)?;
                    conv(&format!("{p}.conv3"), cout, planes, 1)?;
                    bn(&format!("{p}.bn3"), cout)?;
                    layers.push(cb(1, spec(1, 1)));
                    layers.push(cb(2, spec(3, stride)));
                    layers.push(cb(3, spec(1, 1)));
                } else {
                    conv(&format!("{p}.conv1"), planes, cin, 3)?;
                    bn(&format!("{p}.bn1"), planes)?;
                    conv(&format!("{p}.conv2"), planes, planes, 3)?;
                    bn(&format!("{p}.bn2"), planes)?;
                    layers.push(cb(1, spec(3, stride)));
                    layers.push(cb(2, spec(3, 1)));
                }
                let downsample = if stride != 1 || cin != cout {
                    conv(&format!("{p}.downsample.0"), cout, cin, 1)?;
                    bn(&format!("{p}.downsample.1"), cout)?;
                    Some(ConvBn {
                        conv: format!("{p}.downsample.0"),
                        bn: format!("{p}.downsample.1"),
                        spec: spec(1, stride),
                    })
                } else {
                    None
                };
                blocks.push(Block { layers, downsample });
                cin = cout;
            }
        }
        let features = cin;
        let linear = |name: &str, out: usize, inp: usize| -> Result<()> {
            let b = 1.0 / (inp as f64).sqrt();
            let init = Init::Uniform { lo: -b, up: b };
            vb.get_with_hints((out, inp), &format!("{name}.weight"), init)?;
            vb.get_with_hints(out, &format!("{name}.bias"), init)?;
            Ok(())
        };
        match cfg.head_hidden {
            None => linear("fc", cfg.num_classes, features)?,
            Some(h) => {
                linear("fc.0", h, features)?;
                linear("fc.3", cfg.num_classes, h)?;
            }
        }
        let net = Self {
            store,
            cfg,
            blocks,
            features,
        };
        net.apply_freeze();
        Ok(net)
    }

    /// Marks parameters trainable or frozen according to the configured [`Freeze`].
    pub fn apply_freeze(&self) {
        for p in self.store.params() {
            let frozen = self.cfg.freeze.frozen(&p.name);
            self.store.set_trainable(&p.name, !frozen);
        }
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// The residual blocks, in order.
    pub(crate) fn block_list(&self) -> &[Block] {
        &self.blocks
    }

    /// The BatchNorm layer with parameter prefix `prefix`.
    pub(crate) fn batch_norm(&self, prefix: &str) -> candle_core::Result<BatchNorm2d> {
        self.bn(prefix)
    }

    /// A batch of flat images as the stem's NHWC input.
    pub(crate) fn nhwc_input(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.to_nhwc(xs)
    }

    /// Width of the pooled features the head reads.
    pub fn feature_dim(&self) -> usize {
        self.features
    }

    /// The variable `name`, detached when it is frozen so that no gradient flows into it.
    fn t(&self, name: &str) -> candle_core::Result<Tensor> {
        let v = self
            .store
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("resnet: no parameter `{name}`")))?;
        Ok(if self.store.is_trainable(name) {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        })
    }

    fn bn(&self, prefix: &str) -> candle_core::Result<BatchNorm2d> {
        Ok(BatchNorm2d {
            weight: self.t(&format!("{prefix}.weight"))?,
            bias: self.t(&format!("{prefix}.bias"))?,
            running_mean: self.t(&format!("{prefix}.running_mean"))?,
            running_var: self.t(&format!("{prefix}.running_var"))?,
            num_batches_tracked: self.t(&format!("{prefix}.num_batches_tracked"))?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    fn conv_bn(
        &self,
        x: &Tensor,
        l: &ConvBn,
        train: bool,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        let wname = format!("{}.weight", l.conv);
        // A frozen layer keeps its statistics: evaluation mode.
        let bn_train = train && self.store.is_trainable(&format!("{}.weight", l.bn));
        let bn = self.bn(&l.bn)?;
        if let (Some(q), false) = (self.store.quantized(&wname), bn_train) {
            let (scale, shift) = bn.eval_affine()?;
            return crate::quant::conv2d(x, &q, l.spec, Some((&scale, &shift)), relu);
        }
        self.store.observe(&wname, x)?;
        let w = self.t(&wname)?;
        if !bn_train && !x.track_op() && !w.track_op() && x.device().is_cpu() {
            // Nothing upstream needs a gradient: one fused op, BatchNorm and ReLU applied on
            // the convolution's output in place.
            let (scale, shift) = bn.eval_affine()?;
            // A frozen weight is packed for the direct kernel once, not on every call.
            let packed = self
                .store
                .derived(&wname, super::conv_direct::PackedWeight::from_tensor)?;
            return super::conv::conv2d_affine(x, &w, packed, l.spec, scale, shift, relu);
        }
        let y = conv2d(x, &w, l.spec)?;
        bn.forward_act(&y, bn_train, relu)
    }

    /// Flat `[n, c·h·w]` (or `[n, c, h, w]`) input → NHWC with the stem's channel count.
    fn to_nhwc(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let [c, h, w] = self.cfg.input_shape;
        let n = xs.dim(0)?;
        let x = xs
            .reshape((n, c, h, w))?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        match (c, self.cfg.in_channels) {
            (1, 3) => x.repeat((1, 1, 1, 3)),
            _ => Ok(x),
        }
    }

    /// The pooled backbone features `[n, feature_dim]`.
    pub fn backbone(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.to_nhwc(xs)?;
        let stem = ConvBn {
            conv: "conv1".into(),
            bn: "bn1".into(),
            spec: STEM,
        };
        let mut x = self.conv_bn(&x, &stem, train, true)?;
        x = max_pool2d(
            &x,
            PoolSpec {
                kernel: 3,
                stride: 2,
                padding: 1,
            },
        )?;
        for b in &self.blocks {
            let mut y = x.clone();
            let last = b.layers.len() - 1;
            for (i, l) in b.layers.iter().enumerate() {
                y = self.conv_bn(&y, l, train, i < last)?;
            }
            let skip = match &b.downsample {
                Some(d) => self.conv_bn(&x, d, train, false)?,
                None => x,
            };
            x = super::act::add_relu(&y, &skip)?;
        }
        global_avg_pool(&x)
    }

    /// The head on pooled features: dropout, `fc` (or `fc.0` → ReLU → dropout → `fc.3`).
    pub fn head(&self, feats: &Tensor, ctx: &mut ModelCtx) -> candle_core::Result<Tensor> {
        let p = self.cfg.dropout;
        let lin = |name: &str, x: &Tensor| -> candle_core::Result<Tensor> {
            let wname = format!("{name}.weight");
            let b = self.t(&format!("{name}.bias"))?;
            crate::quant::linear_or(&self.store, &wname, x, Some(&b), || {
                Linear::new(self.t(&wname)?, Some(b.clone())).forward(x)
            })
        };
        let x = ctx.dropout(feats, p)?;
        match self.cfg.head_hidden {
            None => lin("fc", &x),
            Some(_) => {
                let h = super::act::relu(&lin("fc.0", &x)?)?;
                let h = ctx.dropout(&h, p)?;
                lin("fc.3", &h)
            }
        }
    }
}

impl Model for ResNet {
    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn kind(&self) -> &str {
        match self.cfg.arch {
            ResnetArch::Resnet18 => "resnet18",
            ResnetArch::Resnet34 => "resnet34",
            ResnetArch::Resnet50 => "resnet50",
        }
    }

    fn forward(&self, xs: &Tensor, ctx: &mut ModelCtx) -> candle_core::Result<Tensor> {
        if ctx.features_cached() {
            return self.head(xs, ctx);
        }
        let f = self.backbone(xs, ctx.is_train())?;
        self.head(&f, ctx)
    }

    fn cached_features(&self) -> Option<usize> {
        (self.cfg.freeze == Freeze::Backbone).then_some(self.features)
    }

    /// Trains through `model::resnet_train` (no autograd graph) where it applies.
    fn loss_and_grad(
        &self,
        batch: &crate::data::Batch,
        loss: super::Loss,
        ctx: &mut ModelCtx,
        params: &[super::Param],
        grads: &mut super::Grads,
        scale: f32,
    ) -> Result<f64> {
        if self.native_step(batch, loss, ctx) {
            return self.native_loss_and_grad(batch, grads, scale);
        }
        super::autograd_loss_and_grad(self, batch, loss, ctx, params, grads, scale)
    }

    fn features(&self, xs: &Tensor, _mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.backbone(xs, false)
    }

    fn quant_layers(&self) -> Vec<crate::quant::QuantLayer> {
        use crate::quant::QuantLayer;
        let mut v = vec![QuantLayer::conv2d("conv1.weight", STEM)];
        for b in &self.blocks {
            for l in b.layers.iter().chain(&b.downsample) {
                v.push(QuantLayer::conv2d(format!("{}.weight", l.conv), l.spec));
            }
        }
        let heads: &[&str] = match self.cfg.head_hidden {
            None => &["fc.weight"],
            Some(_) => &["fc.0.weight", "fc.3.weight"],
        };
        v.extend(heads.iter().map(|h| QuantLayer::linear(*h)));
        v
    }
}

/// Names of the head (`fc`, `fc.0`, `fc.3`), which a pretrained file never provides.
pub fn head_name(name: &str) -> bool {
    name.starts_with("fc.")
}

/// Names a ResNet cut after `stages` stages does not use: the head and the later stages.
pub fn unused_name(name: &str, stages: usize) -> bool {
    head_name(name)
        || name
            .strip_prefix("layer")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse::<usize>().ok())
            .is_some_and(|k| k > stages)
}

/// Number of input channels of the stem in a weight map (`conv1.weight` is `[w, c, 7, 7]`).
pub fn stem_channels(weights: &std::collections::BTreeMap<String, Tensor>) -> Option<usize> {
    weights
        .get("conv1.weight")
        .and_then(|t| t.dims().get(1).copied())
}

/// The stem width (`conv1.weight`'s output channels) in a weight map.
pub fn stem_width(weights: &std::collections::BTreeMap<String, Tensor>) -> Option<usize> {
    weights
        .get("conv1.weight")
        .and_then(|t| t.dims().first().copied())
}
