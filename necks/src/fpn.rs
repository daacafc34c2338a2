//! FPN (Lin et al. 2017, "Feature Pyramid Networks for Object Detection", §3), as mmdetection 3.x's
//! `mmdet.models.necks.FPN`: 1x1 lateral convs on inputs `start_level..end_level`, a top-down path
//! that adds each coarser lateral resized (nearest, to the finer lateral's exact size), 3x3 output
//! convs, then extra levels up to `num_outs`: stride-2 3x3 convs on the last input (`on_input`),
//! the last lateral (`on_lateral`) or the last output (`on_output`), or max-pooling (no extra
//! convs). Parameter names are mmdetection's (`lateral_convs.{i}.conv.*`, `fpn_convs.{i}.conv.*`).

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use densepred_core::config::defaults as d;
use densepred_core::nn::{Conv2d, ConvCfg};
use densepred_core::ops::resize_nearest;
use densepred_core::ShapeSpec;
use serde::{Deserialize, Serialize};

/// `add_extra_convs`: `false`, `true` (= `"on_input"`), or where the first extra conv reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AddExtraConvs {
    /// `false`: extra levels by max-pooling; `true`: as `"on_input"`.
    Flag(bool),
    /// `"on_input"`, `"on_lateral"` or `"on_output"`.
    Source(String),
}

impl Default for AddExtraConvs {
    fn default() -> Self {
        Self::Flag(false)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtraSource {
    Input,
    Lateral,
    Output,
}

/// `type = "FPN"` config (mmdetection's keyword arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpnConfig {
    /// Channels of each backbone output.
    pub in_channels: Vec<usize>,
    /// Channels of every pyramid level.
    pub out_channels: usize,
    /// Number of output levels.
    pub num_outs: usize,
    /// First input used.
    #[serde(default)]
    pub start_level: usize,
    /// Last input used (−1 = the last).
    #[serde(default = "d::neg_one_i64")]
    pub end_level: i64,
    /// Extra levels by convolutions (see [`AddExtraConvs`]).
    #[serde(default)]
    pub add_extra_convs: AddExtraConvs,
    /// ReLU before every extra conv after the first.
    #[serde(default)]
    pub relu_before_extra_convs: bool,
    /// Only meaningful with `norm_cfg`, which is refused: either value builds the same FPN.
    #[serde(default)]
    pub no_norm_on_lateral: bool,
    /// Normalisation in the ConvModules (not supported yet).
    #[serde(default)]
    pub norm_cfg: Option<toml_table::Any>,
    /// Only `{ mode = "nearest" }` is supported.
    #[serde(default)]
    pub upsample_cfg: Option<UpsampleCfg>,
}

/// `upsample_cfg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsampleCfg {
    /// Interpolation mode.
    pub mode: String,
}

/// An opaque config value kept only to report it.
pub mod toml_table {
    use serde::{Deserialize, Serialize};
    /// Any value.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct Any(pub serde_json::Value);
}

/// The built FPN.
pub struct Fpn {
    lateral_convs: Vec<Conv2d>,
    fpn_convs: Vec<Conv2d>,
    start_level: usize,
    backbone_end_level: usize,
    num_outs: usize,
    extra: Option<ExtraSource>,
    relu_before_extra_convs: bool,
}

/// Xavier-uniform conv init of mmdetection's FPN (`init_cfg = Xavier(distribution="uniform")`),
/// bias 0.
fn conv(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let fan_in = (cin * k * k) as f64;
    let fan_out = (cout * k * k) as f64;
    let bound = (6.0 / (fan_in + fan_out)).sqrt();
    let weight = vb.get_with_hints(
        (cout, cin, k, k),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        cfg: ConvCfg {
            stride,
            padding: k / 2,
            ..Default::default()
        },
    })
}

/// `F.max_pool2d(x, 1, stride=2)`, i.e. every other pixel: `(B, C, H, W)` →
/// `(B, C, ceil(H/2), ceil(W/2))`. Built from pad/reshape/narrow, which candle differentiates (its
/// max-pool backward requires kernel == stride).
fn subsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let x = x.pad_with_zeros(2, 0, h % 2)?.pad_with_zeros(3, 0, w % 2)?;
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    x.reshape((b, c, h2, 2, w2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h2, w2))
}

impl Fpn {
    /// Builds the FPN with parameters under `vb` (`lateral_convs.*`, `fpn_convs.*`).
    ///
    /// Errors: inconsistent levels (`num_outs` smaller than the used inputs, `start_level` past
    /// the inputs), an unknown `add_extra_convs`, `norm_cfg` (not supported yet) or a non-nearest
    /// upsampling mode.
    pub fn new(vb: VarBuilder, c: &FpnConfig) -> Result<Self> {
        let num_ins = c.in_channels.len();
        let end = if c.end_level < 0 || c.end_level as usize == num_ins - 1 {
            num_ins
        } else {
            c.end_level as usize + 1
        };
        if c.start_level >= end || end > num_ins {
            candle_core::bail!(
                "FPN: start_level {} / end_level {} do not fit {num_ins} inputs",
                c.start_level,
                c.end_level
            );
        }
        if c.end_level < 0 && c.num_outs < num_ins - c.start_level {
            candle_core::bail!(
                "FPN: num_outs {} < used inputs {}",
                c.num_outs,
                num_ins - c.start_level
            );
        }
        if c.norm_cfg.is_some() {
            candle_core::bail!("FPN: norm_cfg is not supported yet");
        }
        if let Some(u) = &c.upsample_cfg {
            if u.mode != "nearest" {
                candle_core::bail!(
                    "FPN: upsample_cfg.mode {:?} is not supported (only \"nearest\")",
                    u.mode
                );
            }
        }
        let extra = match &c.add_extra_convs {
            AddExtraConvs::Flag(false) => None,
            AddExtraConvs::Flag(true) => Some(ExtraSource::Input),
            AddExtraConvs::Source(s) => Some(match s.as_str() {
                "on_input" => ExtraSource::Input,
                "on_lateral" => ExtraSource::Lateral,
                "on_output" => ExtraSource::Output,
                o => candle_core::bail!(
                    "FPN: add_extra_convs {o:?} must be on_input, on_lateral or on_output"
                ),
            }),
        };
        let mut lateral_convs = Vec::new();
        let mut fpn_convs = Vec::new();
        for (j, i) in (c.start_level..end).enumerate() {
            lateral_convs.push(conv(
                vb.pp("lateral_convs").pp(j).pp("conv"),
                c.in_channels[i],
                c.out_channels,
                1,
                1,
            )?);
            fpn_convs.push(conv(
                vb.pp("fpn_convs").pp(j).pp("conv"),
                c.out_channels,
                c.out_channels,
                3,
                1,
            )?);
        }
        let extra_levels = (c.num_outs + c.start_level).saturating_sub(end);
        if let Some(src) = extra {
            for i in 0..extra_levels {
                let cin = if i == 0 && src == ExtraSource::Input {
                    c.in_channels[end - 1]
                } else {
                    c.out_channels
                };
                let j = fpn_convs.len();
                fpn_convs.push(conv(
                    vb.pp("fpn_convs").pp(j).pp("conv"),
                    cin,
                    c.out_channels,
                    3,
                    2,
                )?);
            }
        }
        Ok(Self {
            lateral_convs,
            fpn_convs,
            start_level: c.start_level,
            backbone_end_level: end,
            num_outs: c.num_outs,
            extra,
            relu_before_extra_convs: c.relu_before_extra_convs,
        })
    }

    /// `inputs`: the backbone maps `(B, C_i, H_i, W_i)`, finest first → `num_outs` maps
    /// `(B, out_channels, H_l, W_l)`, finest first.
    ///
    /// Errors: a number of inputs different from `in_channels`.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let used = self.lateral_convs.len();
        if inputs.len() < self.backbone_end_level {
            candle_core::bail!(
                "FPN: {} inputs, expected {}",
                inputs.len(),
                self.backbone_end_level
            );
        }
        let mut laterals = self
            .lateral_convs
            .iter()
            .enumerate()
            .map(|(j, l)| l.forward(&inputs[j + self.start_level]))
            .collect::<Result<Vec<_>>>()?;
        for i in (1..used).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            let up = resize_nearest(&laterals[i], h, w)?;
            laterals[i - 1] = (&laterals[i - 1] + up)?;
        }
        let mut outs = (0..used)
            .map(|i| self.fpn_convs[i].forward(&laterals[i]))
            .collect::<Result<Vec<_>>>()?;
        if self.num_outs > outs.len() {
            match self.extra {
                None => {
                    for _ in used..self.num_outs {
                        let last = outs.last().expect("at least one level");
                        outs.push(subsample2(last)?);
                    }
                }
                Some(src) => {
                    let source = match src {
                        ExtraSource::Input => inputs[self.backbone_end_level - 1].clone(),
                        ExtraSource::Lateral => laterals[used - 1].clone(),
                        ExtraSource::Output => outs[used - 1].clone(),
                    };
                    outs.push(self.fpn_convs[used].forward(&source)?);
                    for i in used + 1..self.num_outs {
                        let prev = outs.last().expect("extra level");
                        let x = if self.relu_before_extra_convs {
                            prev.relu()?
                        } else {
                            prev.clone()
                        };
                        outs.push(self.fpn_convs[i].forward(&x)?);
                    }
                }
            }
        }
        Ok(outs)
    }

    /// Channels and strides of the outputs for inputs described by `inputs` (each extra level
    /// doubles the stride).
    pub fn out_shapes(&self, inputs: &[ShapeSpec], out_channels: usize) -> Vec<ShapeSpec> {
        let first = inputs[self.start_level].stride;
        (0..self.num_outs)
            .map(|l| ShapeSpec {
                channels: out_channels,
                stride: first << l,
            })
            .collect()
    }
}
