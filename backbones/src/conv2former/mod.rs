//! Conv2Former (Hou et al. 2022, "Conv2Former: A Simple Transformer-Style ConvNet for Visual
//! Recognition"), computing what the official code computes (HVision-NKU/Conv2Former
//! `models/conv2former.py`, commit 94fd1c4), with its parameter names, so official checkpoints
//! load as they are.
//!
//! Where the code and the paper differ, this follows the code (`../shared/fixtures/backbones/
//! README.md` §2):
//! - the convolutional modulation is `proj(DW_k(GELU(W_a·LN(x))) ⊙ W_v·LN(x))`: the code has a
//!   GELU between the first 1×1 conv and the large depthwise conv that the paper's Eq. 4 omits;
//! - the stem is conv → GELU → BN (twice) → 2×2 conv;
//! - the N variant (and `b_22k`) use a 7×7 kernel, the others 11×11;
//! - the classifier is 1×1 conv to 1280 → GELU → LayerNorm on the stage-4 map, then the spatial
//!   mean and a linear layer (`head.*`, `pred.*`).
//!
//! The official repository has no detection / segmentation backbone. For dense prediction the
//! raw stage outputs are returned; `out_norm = true` adds a channels-first LayerNorm per output
//! (`norm{i}`, ConvNeXt's detection convention), off by default.
//!
//! All tensors are NCHW; every LayerNorm is channels-first with eps 1e-6, the stem's BatchNorms
//! eps 1e-5, GELU is the exact (erf) one.

pub mod pos_gelu;

pub use pos_gelu::{pos_gelu_residual, POS_GELU_RESIDUAL};

/// Conv2Former's fused ops with their implementations (as `densepred_core::ops::dispatch::OPS`
/// lists core's; `backbones/tests/fused_op_paths.rs` checks the list and each fallback).
pub const FUSED_OPS: &[densepred_core::ops::dispatch::Op] = &[POS_GELU_RESIDUAL];

use crate::Backbone;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use densepred_core::nn::{drop_path_rate, gelu, BatchNorm2d, Conv2d, ConvCfg, DropPath, Linear};
use densepred_core::ops::{layer_norm_channels, mul_scale_channels};
use densepred_core::ShapeSpec;
use serde::{Deserialize, Serialize};

/// Size presets, as the official factories `conv2former_{n,t,s,b,b_22k,l}` set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conv2FormerVariant {
    /// N: dims 64–512, depths 2/2/8/2, 7×7 kernel (14.99M parameters with the 1k classifier).
    #[serde(rename = "n")]
    N,
    /// T: dims 72–576, depths 3/3/12/3, 11×11 (26.70M).
    #[serde(rename = "t")]
    T,
    /// S: dims 72–576, depths 4/4/32/4, 11×11 (50.03M).
    #[serde(rename = "s")]
    S,
    /// B: dims 96–768, depths 4/4/34/4, 11×11 (90.03M).
    #[serde(rename = "b")]
    B,
    /// B for ImageNet-22k: as B with a 7×7 kernel (88.78M).
    #[serde(rename = "b_22k")]
    B22k,
    /// L: dims 128–1024, depths 4/4/48/4, 11×11 (198.89M).
    #[serde(rename = "l")]
    L,
}

/// The `[backbone]` table of `type = "Conv2Former"`: the official constructor's arguments, each
/// optional; a `variant` fills the ones not given, without one the constructor's defaults apply
/// (`kernel_size` has none there and must then be given; `num_classes` defaults to 0 = no
/// classifier here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conv2FormerConfig {
    /// Size preset `"n" | "t" | "s" | "b" | "b_22k" | "l"`.
    pub variant: Option<Conv2FormerVariant>,
    /// Side of the modulation's depthwise kernel (odd).
    pub kernel_size: Option<usize>,
    /// Channels `C_i` of the four stages.
    pub dims: Option<Vec<usize>>,
    /// Blocks per stage.
    pub depths: Option<Vec<usize>>,
    /// MLP hidden ratio per stage (integers, as the official `dim * mlp_ratio`).
    pub mlp_ratios: Option<Vec<usize>>,
    /// Classes of the classifier (1×1 conv to 1280, GELU, LayerNorm, pool, linear); 0 = none.
    pub num_classes: Option<usize>,
    /// Stochastic depth, increasing linearly from 0 over all blocks to this rate.
    pub drop_path_rate: Option<f64>,
    /// Stages (0-based) whose maps `forward` returns (default all four).
    pub out_indices: Option<Vec<usize>>,
    /// Stages `0..=frozen_stages` (with their downsampling layers) run in eval mode without
    /// gradients (−1 = none), as mmdet.
    pub frozen_stages: Option<i64>,
    /// A channels-first LayerNorm (`norm{i}`) on every returned map.
    pub out_norm: Option<bool>,
}

/// Fully resolved Conv2Former hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2FormerParams {
    /// Depthwise kernel side.
    pub kernel_size: usize,
    /// Stage channels.
    pub dims: [usize; 4],
    /// Blocks per stage.
    pub depths: [usize; 4],
    /// MLP ratios.
    pub mlp_ratios: [usize; 4],
    /// Classifier classes (0 = none).
    pub num_classes: usize,
    /// Final stochastic-depth rate.
    pub drop_path_rate: f64,
    /// Returned stages.
    pub out_indices: Vec<usize>,
    /// Frozen stages (−1 = none).
    pub frozen_stages: i64,
    /// Per-output LayerNorm.
    pub out_norm: bool,
}

fn four<T: Copy + std::fmt::Debug>(v: &[T], field: &str) -> std::result::Result<[T; 4], String> {
    v.try_into()
        .map_err(|_| format!("Conv2Former: `{field}` needs 4 values (one per stage), got {v:?}"))
}

impl Conv2FormerConfig {
    /// Applies the preset (or the official constructor's defaults) and checks consistency.
    ///
    /// Errors: lists without 4 entries, no `kernel_size` (and no variant), an even kernel, odd
    /// `dims[0]` (the stem halves it), out-of-range `out_indices`.
    pub fn resolve(&self) -> std::result::Result<Conv2FormerParams, String> {
        use Conv2FormerVariant as V;
        let preset = self.variant.map(|v| match v {
            V::N => (7, [64, 128, 256, 512], [2, 2, 8, 2]),
            V::T => (11, [72, 144, 288, 576], [3, 3, 12, 3]),
            V::S => (11, [72, 144, 288, 576], [4, 4, 32, 4]),
            V::B => (11, [96, 192, 384, 768], [4, 4, 34, 4]),
            V::B22k => (7, [96, 192, 384, 768], [4, 4, 34, 4]),
            V::L => (11, [128, 256, 512, 1024], [4, 4, 48, 4]),
        });
        let (k0, d0, n0) = match preset {
            Some((k, d, n)) => (Some(k), d, n),
            None => (None, [96, 192, 384, 768], [3, 3, 9, 3]),
        };
        let kernel_size = self.kernel_size.or(k0).ok_or_else(|| {
            "Conv2Former: `kernel_size` is required without a `variant` (the official \
             constructor has no default)"
                .to_string()
        })?;
        if kernel_size % 2 == 0 {
            return Err(format!(
                "Conv2Former: `kernel_size` must be odd (\"same\" padding k/2), got {kernel_size}"
            ));
        }
        let dims = match &self.dims {
            Some(v) => four(v, "dims")?,
            None => d0,
        };
        if dims[0] % 2 != 0 || dims.contains(&0) {
            return Err(format!(
                "Conv2Former: `dims` must be positive with an even first entry, got {dims:?}"
            ));
        }
        let out_indices = self.out_indices.clone().unwrap_or(vec![0, 1, 2, 3]);
        if out_indices.is_empty() || out_indices.iter().any(|&i| i > 3) {
            return Err(format!(
                "Conv2Former: `out_indices` must list stages 0..=3, got {out_indices:?}"
            ));
        }
        Ok(Conv2FormerParams {
            kernel_size,
            dims,
            depths: match &self.depths {
                Some(v) => four(v, "depths")?,
                None => n0,
            },
            mlp_ratios: match &self.mlp_ratios {
                Some(v) => four(v, "mlp_ratios")?,
                None => [4; 4],
            },
            num_classes: self.num_classes.unwrap_or(0),
            drop_path_rate: self.drop_path_rate.unwrap_or(0.0),
            out_indices,
            frozen_stages: self.frozen_stages.unwrap_or(-1),
            out_norm: self.out_norm.unwrap_or(false),
        })
    }
}

/// The official custom `LayerNorm(data_format="channels_first")`: mean and biased variance over
/// `C` of `(B, C, H, W)`, eps 1e-6, then `weight`, `bias` per channel.
struct ChannelNorm {
    weight: Tensor,
    bias: Tensor,
}

impl ChannelNorm {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_channels(x, &self.weight, &self.bias, 1e-6)
    }
}

/// A convolution initialised as the official `_init_weights` does (weights N(0, 0.02²), the
/// `trunc_normal_(std=.02)` whose ±2 truncation never triggers at that std; biases 0).
fn conv(
    vb: VarBuilder,
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: ConvCfg,
    bias: bool,
) -> Result<Conv2d> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    Conv2d::with_init(vb, in_c, out_c, k, cfg, bias, init)
}

fn conv1x1(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Conv2d> {
    conv(vb, in_c, out_c, 1, ConvCfg::default(), true)
}

fn depthwise(vb: VarBuilder, c: usize, k: usize) -> Result<Conv2d> {
    let cfg = ConvCfg {
        padding: k / 2,
        groups: c,
        ..Default::default()
    };
    conv(vb, c, c, k, cfg, true)
}

/// Stem (`downsample_layers.0`, ÷4): conv 3×3/2 → GELU → BN → conv 3×3 → GELU → BN → conv 2×2/2,
/// all without bias.
struct Stem {
    conv0: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn5: BatchNorm2d,
    conv6: Conv2d,
}

impl Stem {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let half = dim / 2;
        let s2p1 = ConvCfg {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let s1p1 = ConvCfg {
            padding: 1,
            ..Default::default()
        };
        let s2 = ConvCfg {
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv0: conv(vb.pp("0"), 3, half, 3, s2p1, false)?,
            bn2: BatchNorm2d::new(vb.pp("2"), half, 1e-5)?,
            conv3: conv(vb.pp("3"), half, half, 3, s1p1, false)?,
            bn5: BatchNorm2d::new(vb.pp("5"), half, 1e-5)?,
            conv6: conv(vb.pp("6"), half, dim, 2, s2, false)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn2.forward(&gelu(&self.conv0.forward(x)?)?, train)?;
        let x = self.bn5.forward(&gelu(&self.conv3.forward(&x)?)?, train)?;
        self.conv6.forward(&x)
    }
}

/// `downsample_layers.{1,2,3}` (÷2): channels-first LayerNorm → conv 2×2/2 with bias.
struct Downsample {
    norm: ChannelNorm,
    conv: Conv2d,
}

impl Downsample {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        let s2 = ConvCfg {
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            norm: ChannelNorm::new(vb.pp("0"), in_c)?,
            conv: conv(vb.pp("1"), in_c, out_c, 2, s2, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&self.norm.forward(x)?)
    }
}

/// Convolutional modulation (official `SpatialAttention`):
/// `proj(DW_k(GELU(att0(y))) ⊙ v(y))`, `y = LN(x)`.
struct ConvMod {
    norm: ChannelNorm,
    att0: Conv2d,
    att2: Conv2d,
    v: Conv2d,
    proj: Conv2d,
}

impl ConvMod {
    fn new(vb: VarBuilder, dim: usize, k: usize) -> Result<Self> {
        Ok(Self {
            norm: ChannelNorm::new(vb.pp("norm"), dim)?,
            att0: conv1x1(vb.pp("att").pp("0"), dim, dim)?,
            att2: depthwise(vb.pp("att").pp("2"), dim, k)?,
            v: conv1x1(vb.pp("v"), dim, dim)?,
            proj: conv1x1(vb.pp("proj"), dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.norm.forward(x)?;
        let a = self.att2.forward(&gelu(&self.att0.forward(&y)?)?)?;
        self.proj.forward(&(a * self.v.forward(&y)?)?)
    }
}

/// The official `MLP`: `fc2(h + GELU(pos(h)))`, `h = GELU(fc1(LN(x)))`, hidden `ratio · C`.
struct Mlp {
    norm: ChannelNorm,
    fc1: Conv2d,
    pos: Conv2d,
    fc2: Conv2d,
}

impl Mlp {
    fn new(vb: VarBuilder, dim: usize, ratio: usize) -> Result<Self> {
        let hidden = dim * ratio;
        Ok(Self {
            norm: ChannelNorm::new(vb.pp("norm"), dim)?,
            fc1: conv1x1(vb.pp("fc1"), dim, hidden)?,
            pos: depthwise(vb.pp("pos"), hidden, 3)?,
            fc2: conv1x1(vb.pp("fc2"), hidden, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = gelu(&self.fc1.forward(&self.norm.forward(x)?)?)?;
        let bias =
            self.pos.bias.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("Conv2Former MLP: `pos` has no bias".into())
            })?;
        self.fc2
            .forward(&pos_gelu_residual(&h, &self.pos.weight, bias)?)
    }
}

/// One block: `x + ls1·ConvMod(x)`, then `+ ls2·MLP(x)` (layer scales per channel, init 1e-6),
/// each branch through stochastic depth.
struct Block {
    attn: ConvMod,
    mlp: Mlp,
    ls1: Tensor,
    ls2: Tensor,
    drop_path: DropPath,
}

impl Block {
    fn new(vb: VarBuilder, dim: usize, k: usize, ratio: usize, drop_path: f64) -> Result<Self> {
        Ok(Self {
            attn: ConvMod::new(vb.pp("attn"), dim, k)?,
            mlp: Mlp::new(vb.pp("mlp"), dim, ratio)?,
            ls1: vb.get_with_hints(dim, "layer_scale_1", Init::Const(1e-6))?,
            ls2: vb.get_with_hints(dim, "layer_scale_2", Init::Const(1e-6))?,
            drop_path: DropPath { p: drop_path },
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Per-channel scales as our channel op (candle's broadcast multiply and the reduction of
        // its backward were ~10% of a training step in `perf`).
        let a = mul_scale_channels(&self.attn.forward(x)?, &self.ls1)?;
        let x = (x + self.drop_path.forward(&a, train)?)?;
        let m = mul_scale_channels(&self.mlp.forward(&x)?, &self.ls2)?;
        x + self.drop_path.forward(&m, train)?
    }
}

enum Down {
    Stem(Stem),
    Layer(Downsample),
}

/// The classifier: `pred(mean_hw(LN(GELU(conv(stage4)))))`.
struct Classifier {
    conv: Conv2d,
    norm: ChannelNorm,
    pred: Linear,
}

/// The Conv2Former network: four downsampling layers and stages, optional per-output norms and
/// an optional classifier.
pub struct Conv2Former {
    downs: Vec<Down>,
    stages: Vec<Vec<Block>>,
    out_norms: Vec<Option<ChannelNorm>>,
    classifier: Option<Classifier>,
    params: Conv2FormerParams,
}

impl Conv2Former {
    /// Builds the network, creating or fetching parameters under their official names from `vb`
    /// (`downsample_layers.*`, `stages.{i}.{j}.*`, `head.*`, `pred.*`; `norm{i}.*` with
    /// `out_norm`).
    ///
    /// Errors: an inconsistent configuration ([`Conv2FormerConfig::resolve`]) or a stored
    /// parameter of the wrong shape.
    pub fn new(vb: VarBuilder, cfg: &Conv2FormerConfig) -> Result<Self> {
        let p = cfg.resolve().map_err(candle_core::Error::msg)?;
        let total: usize = p.depths.iter().sum();
        let dpr = |i: usize| drop_path_rate(p.drop_path_rate, i, total);
        let dl = vb.pp("downsample_layers");
        let mut downs = Vec::with_capacity(4);
        let mut stages = Vec::with_capacity(4);
        let mut cur = 0;
        for i in 0..4 {
            downs.push(if i == 0 {
                Down::Stem(Stem::new(dl.pp("0"), p.dims[0])?)
            } else {
                Down::Layer(Downsample::new(dl.pp(i), p.dims[i - 1], p.dims[i])?)
            });
            let blocks = (0..p.depths[i])
                .map(|j| {
                    Block::new(
                        vb.pp("stages").pp(i).pp(j),
                        p.dims[i],
                        p.kernel_size,
                        p.mlp_ratios[i],
                        dpr(cur + j),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            cur += p.depths[i];
            stages.push(blocks);
        }
        let out_norms = (0..4)
            .map(|i| {
                if p.out_norm && p.out_indices.contains(&i) {
                    ChannelNorm::new(vb.pp(format!("norm{i}")), p.dims[i]).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let classifier = if p.num_classes > 0 {
            Some(Classifier {
                conv: conv1x1(vb.pp("head").pp("0"), p.dims[3], 1280)?,
                norm: ChannelNorm::new(vb.pp("head").pp("2"), 1280)?,
                pred: Linear::new(vb.pp("pred"), 1280, p.num_classes, true)?,
            })
        } else {
            None
        };
        Ok(Self {
            downs,
            stages,
            out_norms,
            classifier,
            params: p,
        })
    }

    /// The resolved hyper-parameters.
    pub fn params(&self) -> &Conv2FormerParams {
        &self.params
    }

    /// The four raw stage outputs `(B, C_i, H_i, W_i)` (official `stages[i]` outputs, strides 4,
    /// 8, 16, 32: `H_1 = floor(ceil(H/2)/2)`, then floor halving), without the output norms.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(4);
        let mut x = x.clone();
        for (i, (down, blocks)) in self.downs.iter().zip(&self.stages).enumerate() {
            let frozen = (i as i64) <= self.params.frozen_stages;
            let train_stage = train && !frozen;
            x = match down {
                Down::Stem(s) => s.forward(&x, train_stage)?,
                Down::Layer(d) => d.forward(&x)?,
            };
            for b in blocks {
                x = b.forward(&x, train_stage)?;
            }
            if frozen {
                x = x.detach();
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// ImageNet logits `(B, num_classes)` from the stage-4 map.
    ///
    /// Errors: the model was built with `num_classes = 0`.
    pub fn classify(&self, stage4: &Tensor) -> Result<Tensor> {
        let c = self.classifier.as_ref().ok_or_else(|| {
            candle_core::Error::msg("Conv2Former: built without a classifier (num_classes = 0)")
        })?;
        let h = c.norm.forward(&gelu(&c.conv.forward(stage4)?)?)?;
        c.pred.forward(&h.flatten_from(2)?.mean(D::Minus1)?)
    }

    /// Whether the model has a classifier.
    pub fn has_head(&self) -> bool {
        self.classifier.is_some()
    }
}

impl Backbone for Conv2Former {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let all = self.forward_stages(x, train)?;
        self.params
            .out_indices
            .iter()
            .map(|&i| match &self.out_norms[i] {
                Some(n) => n.forward(&all[i]),
                None => Ok(all[i].clone()),
            })
            .collect()
    }

    fn out_shapes(&self) -> Vec<ShapeSpec> {
        self.params
            .out_indices
            .iter()
            .map(|&i| ShapeSpec {
                channels: self.params.dims[i],
                stride: 4 << i,
            })
            .collect()
    }
}

/// Maps an official checkpoint key to our parameter name: strips a leading `backbone.` (mmdet /
/// mmseg checkpoints); the names are otherwise the official ones.
pub fn map_checkpoint_key(key: &str) -> String {
    key.strip_prefix("backbone.").unwrap_or(key).to_string()
}
