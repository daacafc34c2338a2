//! SMT — Scale-Aware Modulation Transformer (Lin et al., ICCV 2023, arXiv 2307.08579), exact to the
//! official PyTorch code (AFeng-x/SMT `models/smt.py` and the mmdet/mmseg backbone wrappers).
//!
//! Structure (token layout `(B, N, C)`, `N = h * w` row-major; the paper's Fig. 2 and §3):
//! * stage 1: stem `Head` (conv k×k/2 → BN → ReLU → conv 2×2/2 → LayerNorm eps 1e-5), /4;
//!   stages 2–4: `OverlapPatchEmbed` (conv 3×3/2, pad 1 → LayerNorm eps 1e-5), /2 each;
//! * blocks: pre-norm `x + g1 * Attn(LN(x))`, `x + g2 * FFN(LN(x))` (LayerNorm eps 1e-6, `g` = 1 or
//!   the per-channel layer scale `gamma_1/2`);
//! * `Attn` is SAM (Scale-Aware Modulation: MHMC + SAA, paper Eq. 1–4) in stages 1–2 and at even
//!   block indices of stage 3, MSA (global multi-head self-attention with a depthwise 3×3 branch on
//!   `v`) at odd indices of stage 3 and in stage 4;
//! * FFN: `fc2(GELU(h + DW3x3(h)))`, `h = fc1(x)` (Shunted Transformer's detail-specific FFN);
//! * each stage ends with LayerNorm `norm{i}` (eps 1e-6); the dense outputs are those maps in NCHW.
//!
//! Parameter names are the official classification `state_dict` keys; [`map_checkpoint_key`]
//! also accepts the detection/segmentation spelling (`attn.dw_conv`, `backbone.` prefix).
//!
//! SMT's fused training ops live beside the model ([`ffn`]: the detail-specific FFN and the
//! pre-norm FFN block; [`mhmc`]: the multi-head mixed convolution), built on core's kernel layer
//! (`densepred_core::kernel`) and public ops; [`FUSED_OPS`] lists them for the dispatch rule of
//! `densepred_core::ops::dispatch`.

pub mod ffn;
pub mod mhmc;

pub use ffn::{detail_ffn, pre_norm_ffn_residual, DETAIL_FFN, PRE_NORM_FFN_RESIDUAL};
pub use mhmc::{multi_head_mixed_conv, MULTI_HEAD_MIXED_CONV};

/// SMT's fused ops with their implementations (as `densepred_core::ops::dispatch::OPS` lists
/// core's; `backbones/tests/fused_op_paths.rs` checks the list is complete and each fallback).
pub const FUSED_OPS: &[densepred_core::ops::dispatch::Op] =
    &[DETAIL_FFN, PRE_NORM_FFN_RESIDUAL, MULTI_HEAD_MIXED_CONV];

use crate::Backbone;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use densepred_core::flops;
use densepred_core::nn::{gelu, BatchNorm2d, Conv2d, ConvCfg, DropPath, LayerNorm, Linear};
use densepred_core::ops::{
    mul_scale_last, token_attention, token_dwconv, transpose_last2, LocalMode,
};
use densepred_core::ShapeSpec;
use serde::{Deserialize, Serialize};

/// The four published sizes (paper Table 1; official `smt_t/s/b/l` factories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtVariant {
    /// SMT-T: dims 64–512, depths 2,2,8,1, mlp 4,4,4,2, stem 3×3 (11.5M params with a 1k head).
    T,
    /// SMT-S: depths 3,4,18,2 (22.55M with a 1k head; the paper's 20.5M is a misprint).
    S,
    /// SMT-B: depths 4,6,28,2, mlp 8,6,4,2, stem 7×7 (32.0M).
    B,
    /// SMT-L: dims 96–768, depths 4,6,28,4 (80.6M with layer scale).
    L,
}

/// The `[backbone]` table of `type = "SMT"`: the official constructor's keyword arguments, each
/// optional; a `variant` preset fills the ones not given, and without a preset the official
/// constructor's defaults apply (except `num_classes`, which defaults to 0 = no head here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtConfig {
    /// Size preset `"t" | "s" | "b" | "l"`.
    pub variant: Option<SmtVariant>,
    /// Channels `C_i` of the four stages.
    pub embed_dims: Option<Vec<usize>>,
    /// SAM heads per stage (−1 where a stage has no SAM blocks).
    pub ca_num_heads: Option<Vec<i64>>,
    /// MSA heads per stage (−1 where a stage has no MSA blocks).
    pub sa_num_heads: Option<Vec<i64>>,
    /// FFN hidden ratio per stage.
    pub mlp_ratios: Option<Vec<f64>>,
    /// Bias in the `v`, `s`, `q`, `kv` projections.
    pub qkv_bias: Option<bool>,
    /// Attention scale override (default `head_dim^-0.5`).
    pub qk_scale: Option<f64>,
    /// Blocks per stage.
    pub depths: Option<Vec<usize>>,
    /// 1 = SAM, 0 = MSA per stage (stage 3 alternates SAM/MSA regardless, as the official code).
    pub ca_attentions: Option<Vec<i64>>,
    /// Stem kernel size (3 or 7).
    pub head_conv: Option<usize>,
    /// SAA inverse-bottleneck expansion.
    pub expand_ratio: Option<usize>,
    /// Per-channel layer scale `gamma_1/2` in every block.
    pub use_layerscale: Option<bool>,
    /// Initial layer-scale value.
    pub layerscale_value: Option<f64>,
    /// Stochastic depth rate, decayed linearly over all blocks from 0.
    pub drop_path_rate: Option<f64>,
    /// ImageNet classes of the linear head; 0 = no head.
    pub num_classes: Option<usize>,
    /// Stages (0-based) whose maps `forward` returns.
    pub out_indices: Option<Vec<usize>>,
    /// Stages `0..=frozen_stages` run in eval mode without gradients (−1 = none), as mmdet.
    pub frozen_stages: Option<i64>,
}

/// Fully resolved SMT hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtParams {
    pub embed_dims: [usize; 4],
    pub ca_num_heads: [i64; 4],
    pub sa_num_heads: [i64; 4],
    pub mlp_ratios: [f64; 4],
    pub qkv_bias: bool,
    pub qk_scale: Option<f64>,
    pub depths: [usize; 4],
    pub ca_attentions: [i64; 4],
    pub head_conv: usize,
    pub expand_ratio: usize,
    pub use_layerscale: bool,
    pub layerscale_value: f64,
    pub drop_path_rate: f64,
    pub num_classes: usize,
    pub out_indices: Vec<usize>,
    pub frozen_stages: i64,
}

fn arr4<T: Copy + std::fmt::Debug>(v: &[T], field: &str) -> std::result::Result<[T; 4], String> {
    v.try_into()
        .map_err(|_| format!("SMT: `{field}` needs 4 values (one per stage), got {v:?}"))
}

impl SmtConfig {
    /// Applies the preset (or the official constructor defaults) and checks consistency.
    ///
    /// Errors: a list that does not have 4 entries, channels not divisible by the head counts,
    /// `head_conv` other than 3 or 7, out-of-range `out_indices`.
    pub fn resolve(&self) -> std::result::Result<SmtParams, String> {
        // Official constructor defaults.
        let (mut dims, mut depths, mut mlp, mut head_conv, mut qkv_bias) = (
            vec![64, 128, 256, 512],
            vec![2, 2, 8, 1],
            vec![8.0, 6.0, 4.0, 2.0],
            3,
            false,
        );
        match self.variant {
            Some(SmtVariant::T) => {
                (depths, mlp, qkv_bias) = (vec![2, 2, 8, 1], vec![4.0, 4.0, 4.0, 2.0], true);
            }
            Some(SmtVariant::S) => {
                (depths, mlp, qkv_bias) = (vec![3, 4, 18, 2], vec![4.0, 4.0, 4.0, 2.0], true);
            }
            Some(SmtVariant::B) => {
                (depths, mlp, head_conv, qkv_bias) =
                    (vec![4, 6, 28, 2], vec![8.0, 6.0, 4.0, 2.0], 7, true);
            }
            Some(SmtVariant::L) => {
                dims = vec![96, 192, 384, 768];
                (depths, mlp, head_conv, qkv_bias) =
                    (vec![4, 6, 28, 4], vec![8.0, 6.0, 4.0, 2.0], 7, true);
            }
            None => {}
        }
        let p = SmtParams {
            embed_dims: arr4(self.embed_dims.as_deref().unwrap_or(&dims), "embed_dims")?,
            ca_num_heads: arr4(
                self.ca_num_heads.as_deref().unwrap_or(&[4, 4, 4, -1]),
                "ca_num_heads",
            )?,
            sa_num_heads: arr4(
                self.sa_num_heads.as_deref().unwrap_or(&[-1, -1, 8, 16]),
                "sa_num_heads",
            )?,
            mlp_ratios: arr4(self.mlp_ratios.as_deref().unwrap_or(&mlp), "mlp_ratios")?,
            qkv_bias: self.qkv_bias.unwrap_or(qkv_bias),
            qk_scale: self.qk_scale,
            depths: arr4(self.depths.as_deref().unwrap_or(&depths), "depths")?,
            ca_attentions: arr4(
                self.ca_attentions.as_deref().unwrap_or(&[1, 1, 1, 0]),
                "ca_attentions",
            )?,
            head_conv: self.head_conv.unwrap_or(head_conv),
            expand_ratio: self.expand_ratio.unwrap_or(2),
            use_layerscale: self.use_layerscale.unwrap_or(false),
            layerscale_value: self.layerscale_value.unwrap_or(1e-4),
            drop_path_rate: self.drop_path_rate.unwrap_or(0.0),
            num_classes: self.num_classes.unwrap_or(0),
            out_indices: self.out_indices.clone().unwrap_or_else(|| vec![0, 1, 2, 3]),
            frozen_stages: self.frozen_stages.unwrap_or(-1),
        };
        if p.head_conv != 3 && p.head_conv != 7 {
            return Err(format!(
                "SMT: `head_conv` must be 3 or 7, got {}",
                p.head_conv
            ));
        }
        if p.out_indices.is_empty() || p.out_indices.iter().any(|&i| i > 3) {
            return Err(format!(
                "SMT: `out_indices` must be non-empty stage indices in 0..=3, got {:?}",
                p.out_indices
            ));
        }
        for i in 0..4 {
            for j in 0..p.depths[i] {
                let c = p.embed_dims[i] as i64;
                let heads = if block_is_sam(&p, i, j) {
                    p.ca_num_heads[i]
                } else {
                    p.sa_num_heads[i]
                };
                let field = if block_is_sam(&p, i, j) {
                    "ca_num_heads"
                } else {
                    "sa_num_heads"
                };
                if heads <= 0 || c % heads != 0 {
                    return Err(format!(
                        "SMT: stage {} block {j} needs `{field}[{i}]` > 0 dividing embed_dims[{i}] = {c}, got {heads}",
                        i + 1
                    ));
                }
            }
        }
        Ok(p)
    }
}

/// The official rule: stage 3 (index 2) alternates SAM (even `j`) and MSA (odd `j`); other stages
/// follow `ca_attentions`.
fn block_is_sam(p: &SmtParams, stage: usize, j: usize) -> bool {
    if stage == 2 && j % 2 == 1 {
        false
    } else {
        p.ca_attentions[stage] == 1
    }
}

/// Stage-1 stem (official `Head`): `(B, 3, H, W)` → tokens `(B, h*w, C0)`, `h = floor(ceil(H/2)/2)`.
struct Stem {
    conv0: Conv2d,
    bn: BatchNorm2d,
    conv3: Conv2d,
    norm: LayerNorm,
}

impl Stem {
    fn new(vb: VarBuilder, k: usize, dim: usize) -> Result<Self> {
        let pad = if k == 7 { 3 } else { 1 };
        let c = vb.pp("conv");
        Ok(Self {
            conv0: Conv2d::new(
                c.pp("0"),
                3,
                dim,
                k,
                ConvCfg {
                    stride: 2,
                    padding: pad,
                    ..Default::default()
                },
                false,
            )?,
            bn: BatchNorm2d::new(c.pp("1"), dim, 1e-5)?,
            conv3: Conv2d::new(
                c.pp("3"),
                dim,
                dim,
                2,
                ConvCfg {
                    stride: 2,
                    ..Default::default()
                },
                true,
            )?,
            norm: LayerNorm::new(vb.pp("norm"), dim, 1e-5)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, usize, usize)> {
        let x = self.bn.forward_relu(&self.conv0.forward(x)?, train)?;
        let x = self.conv3.forward(&x)?;
        let (tokens, h, w) = to_tokens(&x)?;
        Ok((self.norm.forward(&tokens)?, h, w))
    }
}

/// Stages 2–4 (official `OverlapPatchEmbed`): NCHW `(B, C_in, h, w)` → tokens `(B, ceil(h/2)*ceil(w/2), C)`.
struct PatchEmbed {
    proj: Conv2d,
    norm: LayerNorm,
}

impl PatchEmbed {
    fn new(vb: VarBuilder, in_c: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: Conv2d::new(
                vb.pp("proj"),
                in_c,
                dim,
                3,
                ConvCfg {
                    stride: 2,
                    padding: 1,
                    ..Default::default()
                },
                true,
            )?,
            norm: LayerNorm::new(vb.pp("norm"), dim, 1e-5)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (tokens, h, w) = to_tokens(&self.proj.forward(x)?)?;
        Ok((self.norm.forward(&tokens)?, h, w))
    }
}

/// NCHW `(B, C, h, w)` → tokens `(B, h*w, C)`.
fn to_tokens(x: &Tensor) -> Result<(Tensor, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    Ok((transpose_last2(&x.reshape((b, c, h * w))?)?, h, w))
}

/// Tokens `(B, h*w, C)` → NCHW `(B, C, h, w)`.
fn to_map(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    transpose_last2(x)?.reshape((b, c, h, w))
}

/// A depthwise conv of the official code (bias, stride 1, "same" padding), on parameters `weight`
/// `(C, 1, k, k)` and `bias` `(C,)`.
struct DwConv {
    weight: Tensor,
    bias: Tensor,
}

impl DwConv {
    fn new(vb: VarBuilder, c: usize, k: usize) -> Result<Self> {
        // Official init: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups = k*k.
        let weight = vb.get_with_hints(
            (c, 1, k, k),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: (2.0 / (k * k) as f64).sqrt(),
            },
        )?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }

    /// The same convolution applied to tokens `(B, h·w, C)` directly (channels-last), followed by
    /// `mode`.
    fn forward_tokens(&self, x: &Tensor, h: usize, w: usize, mode: LocalMode) -> Result<Tensor> {
        flops::count_token_dwconv(x, self.weight.dim(2)?);
        token_dwconv(x, &self.weight, &self.bias, (h, w), mode)
    }
}

/// SAM: Multi-Head Mixed Convolution + Scale-Aware Aggregation + modulation (paper §3.1).
struct Sam {
    v: Linear,
    s: Linear,
    local_convs: Vec<DwConv>,
    proj0: Conv2d,
    bn: BatchNorm2d,
    proj1: Conv2d,
    proj: Linear,
}

impl Sam {
    fn new(vb: VarBuilder, dim: usize, heads: usize, qkv_bias: bool, er: usize) -> Result<Self> {
        let cg = dim / heads;
        let local_convs = (0..heads)
            .map(|i| DwConv::new(vb.pp(format!("local_conv_{}", i + 1)), cg, 3 + 2 * i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            v: Linear::new(vb.pp("v"), dim, dim, qkv_bias)?,
            s: Linear::new(vb.pp("s"), dim, dim, qkv_bias)?,
            local_convs,
            proj0: Conv2d::new(
                vb.pp("proj0"),
                dim,
                dim * er,
                1,
                ConvCfg {
                    groups: cg,
                    ..Default::default()
                },
                true,
            )?,
            bn: BatchNorm2d::new(vb.pp("bn"), dim * er, 1e-5)?,
            proj1: Conv2d::new(vb.pp("proj1"), dim * er, dim, 1, ConvCfg::default(), true)?,
            proj: Linear::new(vb.pp("proj"), dim, dim, true)?,
        })
    }

    /// The modulator `M` `(B, C, h, w)` (output of `proj1`) for normalised tokens `x` `(B, N, C)`.
    fn modulator(&self, x: &Tensor, h: usize, w: usize, train: bool) -> Result<Tensor> {
        let s = to_map(&self.s.forward(x)?, h, w)?;
        // MHMC: head i convolves its contiguous channel slice with a (3+2i)x(3+2i) kernel. The
        // outputs are interleaved so that channel g*heads + i is channel g of head i: each group of
        // SAA's proj0 then sees one channel of every head (the paper's "scale-aware" mixing).
        let weights: Vec<Tensor> = self.local_convs.iter().map(|c| c.weight.clone()).collect();
        let biases: Vec<Tensor> = self.local_convs.iter().map(|c| c.bias.clone()).collect();
        if flops::active() {
            let per_head = s.elem_count() / weights.len().max(1);
            for wt in &weights {
                let k = wt.dim(2)?;
                flops::count("conv", (per_head * k * k) as u64);
            }
        }
        let mixed = multi_head_mixed_conv(&s, &weights, &biases)?;
        // SAA: grouped 1x1 (W_intra) -> BN -> GELU -> dense 1x1 (W_inter).
        let m = self.bn.forward(&self.proj0.forward(&mixed)?, train)?;
        self.proj1.forward(&gelu(&m)?)
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize, train: bool) -> Result<Tensor> {
        let v = self.v.forward(x)?;
        let m = to_tokens(&self.modulator(x, h, w, train)?)?.0;
        self.proj.forward(&(m * v)?)
    }
}

/// MSA: global multi-head self-attention plus a depthwise 3×3 "local" branch on `v`.
struct Msa {
    q: Linear,
    kv: Linear,
    local_conv: DwConv,
    proj: Linear,
    heads: usize,
    scale: f64,
}

impl Msa {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        qkv_bias: bool,
        qk_scale: Option<f64>,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            q: Linear::new(vb.pp("q"), dim, dim, qkv_bias)?,
            kv: Linear::new(vb.pp("kv"), dim, 2 * dim, qkv_bias)?,
            local_conv: DwConv::new(vb.pp("local_conv"), dim, 3)?,
            proj: Linear::new(vb.pp("proj"), dim, dim, true)?,
            heads,
            scale: qk_scale.unwrap_or((head_dim as f64).powf(-0.5)),
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let c = x.dim(2)?;
        let q = self.q.forward(x)?;
        // kv (B, N, 2C): keys in channels 0..C, values in C..2C (the official
        // reshape(B, N, 2, heads, d)); the attention reads the heads in place.
        let kv = self.kv.forward(x)?;
        flops::count_token_attention(&q, &kv);
        let o = token_attention(&q, &kv, self.heads, self.scale)?;
        // The local branch: DW3x3 on v in token layout (v.transpose(1, 2).reshape(B, N, C)).
        let v_tokens = kv.narrow(2, c, c)?;
        let local = self
            .local_conv
            .forward_tokens(&v_tokens, h, w, LocalMode::Plain)?;
        self.proj.forward(&(o + local)?)
    }
}

enum Attention {
    Sam(Sam),
    Msa(Msa),
}

/// Shunted Transformer's detail-specific FFN: `fc2(GELU(h + DW3x3(h)))`, `h = fc1(x)`.
struct Mlp {
    fc1: Linear,
    dwconv: DwConv,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), dim, hidden, true)?,
            dwconv: DwConv::new(vb.pp("dwconv").pp("dwconv"), hidden, 3)?,
            fc2: Linear::new(vb.pp("fc2"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        // fc1 → GELU(h + DW3x3(h)) → fc2 on tokens; one op when training on the CPU.
        let (b1, b2) = self.biases()?;
        self.count(x);
        detail_ffn(
            x,
            &self.fc1.weight,
            b1,
            &self.dwconv.weight,
            &self.dwconv.bias,
            &self.fc2.weight,
            b2,
            (h, w),
        )
    }

    /// Counts the fused FFN's layers (fc1, the 3×3 depthwise conv, fc2) for tokens `x`.
    fn count(&self, x: &Tensor) {
        if let (Ok((hidden, c)), Ok(co)) = (self.fc1.weight.dims2(), self.fc2.weight.dim(0)) {
            let rows = x.elem_count() / c.max(1);
            flops::count("linear", (rows * c * hidden + rows * hidden * co) as u64);
            flops::count("conv", (rows * hidden * 9) as u64);
        }
    }

    /// `(fc1.bias, fc2.bias)`: the official `Mlp` always has both.
    fn biases(&self) -> Result<(&Tensor, &Tensor)> {
        match (&self.fc1.bias, &self.fc2.bias) {
            (Some(b1), Some(b2)) => Ok((b1, b2)),
            _ => candle_core::bail!("SMT Mlp: fc1 and fc2 have biases"),
        }
    }

    /// `x + self.forward(norm(x))`, fused (`ops::pre_norm_ffn_residual`).
    fn forward_pre_norm_residual(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        h: usize,
        w: usize,
    ) -> Result<Tensor> {
        let (b1, b2) = self.biases()?;
        flops::count("layer_norm", 5 * x.elem_count() as u64);
        self.count(x);
        pre_norm_ffn_residual(
            x,
            &norm.weight,
            &norm.bias,
            norm.eps,
            &self.fc1.weight,
            b1,
            &self.dwconv.weight,
            &self.dwconv.bias,
            &self.fc2.weight,
            b2,
            (h, w),
        )
    }
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    gammas: Option<(Tensor, Tensor)>,
    drop_path: DropPath,
}

impl Block {
    fn new(vb: VarBuilder, p: &SmtParams, stage: usize, j: usize, drop_path: f64) -> Result<Self> {
        let dim = p.embed_dims[stage];
        let attn_vb = vb.pp("attn");
        let attn = if block_is_sam(p, stage, j) {
            Attention::Sam(Sam::new(
                attn_vb,
                dim,
                p.ca_num_heads[stage] as usize,
                p.qkv_bias,
                p.expand_ratio,
            )?)
        } else {
            Attention::Msa(Msa::new(
                attn_vb,
                dim,
                p.sa_num_heads[stage] as usize,
                p.qkv_bias,
                p.qk_scale,
            )?)
        };
        let gammas = if p.use_layerscale {
            let init = Init::Const(p.layerscale_value);
            Some((
                vb.get_with_hints(dim, "gamma_1", init)?,
                vb.get_with_hints(dim, "gamma_2", init)?,
            ))
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-6)?,
            attn,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-6)?,
            mlp: Mlp::new(
                vb.pp("mlp"),
                dim,
                (dim as f64 * p.mlp_ratios[stage]) as usize,
            )?,
            gammas,
            drop_path: DropPath { p: drop_path },
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize, train: bool) -> Result<Tensor> {
        let y = self.norm1.forward(x)?;
        let a = match &self.attn {
            Attention::Sam(s) => s.forward(&y, h, w, train)?,
            Attention::Msa(m) => m.forward(&y, h, w)?,
        };
        let a = match &self.gammas {
            Some((g1, _)) => mul_scale_last(&a, g1)?,
            None => a,
        };
        let x = (x + self.drop_path.forward(&a, train)?)?;
        // `x + mlp(norm2(x))` as one op when nothing sits between the FFN and the residual add
        // (no layer scale, no active DropPath).
        if self.gammas.is_none() && (!train || self.drop_path.p <= 0.0) {
            return self.mlp.forward_pre_norm_residual(&x, &self.norm2, h, w);
        }
        let f = self.mlp.forward(&self.norm2.forward(&x)?, h, w)?;
        let f = match &self.gammas {
            Some((_, g2)) => mul_scale_last(&f, g2)?,
            None => f,
        };
        x + self.drop_path.forward(&f, train)?
    }
}

enum Embed {
    Stem(Stem),
    Patch(PatchEmbed),
}

struct Stage {
    embed: Embed,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

/// The SMT network: four stages and an optional classification head.
pub struct Smt {
    stages: Vec<Stage>,
    head: Option<Linear>,
    params: SmtParams,
}

/// Intermediate tensors of one forward pass, named as the fixtures' `__debug__.*` entries.
pub type DebugTensors = Vec<(String, Tensor)>;

impl Smt {
    /// Builds the network, creating or fetching parameters under their official names from `vb`.
    ///
    /// Errors: an inconsistent configuration (see [`SmtConfig::resolve`]) or a stored parameter of
    /// the wrong shape.
    pub fn new(vb: VarBuilder, cfg: &SmtConfig) -> Result<Self> {
        let p = cfg.resolve().map_err(candle_core::Error::msg)?;
        let total: usize = p.depths.iter().sum();
        let dpr = |i: usize| densepred_core::nn::drop_path_rate(p.drop_path_rate, i, total);
        let mut cur = 0;
        let mut stages = Vec::with_capacity(4);
        for i in 0..4 {
            let embed = if i == 0 {
                Embed::Stem(Stem::new(
                    vb.pp("patch_embed1"),
                    p.head_conv,
                    p.embed_dims[0],
                )?)
            } else {
                Embed::Patch(PatchEmbed::new(
                    vb.pp(format!("patch_embed{}", i + 1)),
                    p.embed_dims[i - 1],
                    p.embed_dims[i],
                )?)
            };
            let blocks = (0..p.depths[i])
                .map(|j| {
                    Block::new(
                        vb.pp(format!("block{}", i + 1)).pp(j),
                        &p,
                        i,
                        j,
                        dpr(cur + j),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            cur += p.depths[i];
            let norm = LayerNorm::new(vb.pp(format!("norm{}", i + 1)), p.embed_dims[i], 1e-6)?;
            stages.push(Stage {
                embed,
                blocks,
                norm,
            });
        }
        let head = if p.num_classes > 0 {
            Some(Linear::new(
                vb.pp("head"),
                p.embed_dims[3],
                p.num_classes,
                true,
            )?)
        } else {
            None
        };
        Ok(Self {
            stages,
            head,
            params: p,
        })
    }

    /// The resolved hyper-parameters.
    pub fn params(&self) -> &SmtParams {
        &self.params
    }

    /// Runs all four stages on `x` `(B, 3, H, W)` and returns the four stage maps
    /// `(B, C_i, H_i, W_i)` (after `norm{i}`, strides 4, 8, 16, 32 with ceil rounding), plus the
    /// debug tensors when `debug` is set.
    pub fn forward_all(
        &self,
        x: &Tensor,
        train: bool,
        debug: bool,
    ) -> Result<(Vec<Tensor>, DebugTensors)> {
        let mut outs = Vec::with_capacity(4);
        let mut dbg = Vec::new();
        let mut x = x.clone();
        for (i, st) in self.stages.iter().enumerate() {
            let frozen = (i as i64) <= self.params.frozen_stages;
            let train_stage = train && !frozen;
            let (mut t, h, w) = match &st.embed {
                Embed::Stem(s) => s.forward(&x, train_stage)?,
                Embed::Patch(p) => p.forward(&x)?,
            };
            if debug {
                dbg.push((format!("__debug__.patch_embed{}", i + 1), t.clone()));
            }
            for (j, blk) in st.blocks.iter().enumerate() {
                if debug {
                    if let Attention::Sam(s) = &blk.attn {
                        let m = s.modulator(&blk.norm1.forward(&t)?, h, w, false)?;
                        dbg.push((format!("__debug__.block{}.{j}.attn.modulator", i + 1), m));
                    }
                }
                t = blk.forward(&t, h, w, train_stage)?;
                if debug {
                    dbg.push((format!("__debug__.block{}.{j}", i + 1), t.clone()));
                }
            }
            let mut map = to_map(&st.norm.forward(&t)?, h, w)?;
            if frozen {
                map = map.detach();
            }
            outs.push(map.clone());
            x = map;
        }
        Ok((outs, dbg))
    }

    /// ImageNet logits `(B, num_classes)`: mean over the tokens of stage 4 after `norm4`, then the
    /// linear head. Errors when the model was built with `num_classes = 0`.
    pub fn classify(&self, stage4: &Tensor) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            candle_core::Error::msg("SMT: built without a classification head (num_classes = 0)")
        })?;
        head.forward(&stage4.flatten_from(2)?.mean(D::Minus1)?)
    }

    /// Whether the model has a classification head.
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }
}

impl Backbone for Smt {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let (all, _) = self.forward_all(x, train, false)?;
        Ok(self
            .params
            .out_indices
            .iter()
            .map(|&i| all[i].clone())
            .collect())
    }

    fn out_shapes(&self) -> Vec<ShapeSpec> {
        self.params
            .out_indices
            .iter()
            .map(|&i| ShapeSpec {
                channels: self.params.embed_dims[i],
                stride: 4 << i,
            })
            .collect()
    }
}

/// Maps an official checkpoint key to our parameter name: strips a leading `backbone.` (mmdet /
/// mmseg checkpoints) and renames the detection wrapper's MSA `attn.dw_conv.*` to the classification
/// spelling `attn.local_conv.*` (SAM's `attn.local_conv_{i}` are different parameters and are left
/// alone).
pub fn map_checkpoint_key(key: &str) -> String {
    let k = key.strip_prefix("backbone.").unwrap_or(key);
    k.replace(".attn.dw_conv.", ".attn.local_conv.")
}
