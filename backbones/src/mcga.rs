//! MCGA (Vo et al., "Multi-scale Convolutions Meet Group Attention for Dense Prediction
//! Tasks"): a four-stage hierarchical backbone whose blocks are `X + MCGA(LN(X))` then
//! `X + MLP(LN(X))`. No official code was released: this is the first public implementation,
//! written from the paper (§3, Fig. 1–4, "Model Configuration"), with every point the paper leaves
//! open decided below (the list follows `../shared/fixtures/backbones/README.md` §3.2).
//!
//! The MCGA attention on tokens `X` `(L, d)` of an `H × W` map (Fig. 3):
//! 1. local queries `Q3 = DW3x3(X)`, `Q5 = DW5x5(X)` (depthwise, "same" padding, with bias);
//! 2. group attention: learnable group tokens `T` `(G, d)` query the image tokens,
//!    `GA = softmax(T W_Q (X W_K)ᵀ / √d_h) X W_V` `(G, d)` — cost linear in `L`;
//! 3. feature propagation: a spatial (token-mixing) MLP-Mixer layer over the `G` grouped tokens,
//!    `M = GA + MLP_G(LN(GA))` with the MLP acting along the group axis;
//! 4. two cross-attentions carry `M` back: `O_k = softmax(Q_k (M W_K^k)ᵀ / √d_h) M W_V^k` for
//!    `k ∈ {3, 5}` (each `L × G`);
//! 5. fusion `P3(O3) + P5(O5)`.
//!
//! Decisions where the paper is silent (each with its reason):
//! 1. **Patch embedding** ([`McgaPatchEmbed`]): the paper's "depthwise convolution with stride p"
//!    cannot map 3 → 32 channels, so a dense convolution is used: overlapping, PVTv2-style (7×7
//!    stride 4 for stage 1, 3×3 stride 2 after), with bias, then LayerNorm (`Overlapping`, the
//!    default: it keeps the FLOPs at the paper's 0.7 G); `Patchify` is the non-overlapping p×p
//!    alternative.
//! 2. **Local queries** read the block's normalised input `LN(X)` (the attention's input in the
//!    paper's block equation) through the depthwise convs only, no extra linear projection:
//!    the paper sets "the output of 3×3 depthwise convolution … as query".
//! 3. **Group tokens** are per block (each attention layer has its own `T`, as each has its own
//!    projections), initialised N(0, 0.02²).
//! 4. **Heads**: `{2, 2, 4, 8}` heads per stage, head dim `d / heads`, scale `1/√(d / heads)`
//!    (the standard multi-head scale; the paper's `1/√d` is its single-head notation); the
//!    cross-attentions use the same heads.
//! 5. **Projections**: group attention has `W_Q` (on `T`) and a fused `W_K, W_V` on the image
//!    tokens; each cross-attention branch has its own key/value projection of `M`
//!    ([`McgaCrossKv::Separate`], default: the paper describes two group-attention branches, each
//!    with its own key and value; this also brings the parameter count to the paper's 10.3 M);
//!    `Shared` uses one for both. All projections have biases (`qkv_bias`).
//! 6. **Mixer**: pre-norm LayerNorm, token-mixing MLP `G → mixer_ratio·G → G` with GELU, residual;
//!    no channel-mixing MLP (the block's MLP follows). No interpolation: `G` is fixed.
//! 7. **Fusion** ([`McgaFusion`]): `P3(O3) + P5(O5)` (`PerBranch`, default: "fused together by
//!    simple linear projections and summation"), or `P(O3 + O5)` (`AfterSum`).
//! 8. **Norms and classifier**: every stage ends with a LayerNorm (`norm{i}`, PVT's layout), which
//!    the dense outputs use; the classifier averages the stage-4 tokens, then `fc1` (to
//!    `head_hidden` = 1280) → GELU → `fc2` ("linear layers", plural; 0 = one linear layer).
//! 9. **Depths** `{2, 2, 6, 6}` as the paper's table.
//!
//! With these choices the ImageNet classifier (`configs/backbones/mcga_in1k.toml`) has
//! 10,702,632 parameters (paper 10.3 M, +3.9%).

use crate::Backbone;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use densepred_core::flops;
use densepred_core::nn::{drop_path_rate, gelu, Conv2d, ConvCfg, DropPath, LayerNorm, Linear};
use densepred_core::ops::{token_attention, token_dwconv, LocalMode};
use densepred_core::ShapeSpec;
use serde::{Deserialize, Serialize};

/// Size presets (the paper reports one model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum McgaVariant {
    /// The paper's model: channels 32/64/128/256, blocks 2/2/6/6, heads 2/2/4/8, MLP ratio 4,
    /// 8 group tokens.
    #[serde(rename = "tiny")]
    Tiny,
}

/// How the stage inputs are cut into tokens (decision 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McgaPatchEmbed {
    /// PVTv2-style overlapping conv: 7×7 stride 4 (stage 1), 3×3 stride 2 (stages 2–4).
    #[default]
    Overlapping,
    /// Non-overlapping p×p conv with stride p (4, then 2).
    Patchify,
}

/// Key/value projections of the mixed group tokens in the two cross-attentions (decision 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McgaCrossKv {
    /// One key/value projection per branch (`kv3`, `kv5`).
    #[default]
    Separate,
    /// One projection (`kv_m`) for both branches.
    Shared,
}

/// How the two branches are fused (decision 7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McgaFusion {
    /// `proj3(O3) + proj5(O5)`.
    #[default]
    PerBranch,
    /// `proj(O3 + O5)`.
    AfterSum,
}

/// The `[backbone]` table of `type = "MCGA"`; a `variant` fills the fields not given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McgaConfig {
    /// Size preset (`"tiny"`, the paper's model).
    pub variant: Option<McgaVariant>,
    /// Channels `C_i` of the four stages.
    pub embed_dims: Option<Vec<usize>>,
    /// Blocks per stage.
    pub depths: Option<Vec<usize>>,
    /// Attention heads per stage.
    pub num_heads: Option<Vec<usize>>,
    /// MLP hidden ratio per stage.
    pub mlp_ratios: Option<Vec<usize>>,
    /// Group tokens `G` per attention layer.
    pub num_groups: Option<usize>,
    /// Hidden size of the token-mixing MLP, as a multiple of `G`.
    pub mixer_ratio: Option<usize>,
    /// Biases on the attention projections.
    pub qkv_bias: Option<bool>,
    /// Patch embedding kind.
    pub patch_embed: Option<McgaPatchEmbed>,
    /// Cross-attention key/value projections.
    pub cross_kv: Option<McgaCrossKv>,
    /// Branch fusion.
    pub fusion: Option<McgaFusion>,
    /// Classes of the classifier; 0 = none.
    pub num_classes: Option<usize>,
    /// Hidden width of the classifier (0 = a single linear layer).
    pub head_hidden: Option<usize>,
    /// Stochastic depth, increasing linearly from 0 over all blocks to this rate.
    pub drop_path_rate: Option<f64>,
    /// Stages (0-based) whose maps `forward` returns (default all four).
    pub out_indices: Option<Vec<usize>>,
    /// Stages `0..=frozen_stages` run in eval mode without gradients (−1 = none).
    pub frozen_stages: Option<i64>,
}

/// Fully resolved MCGA hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct McgaParams {
    /// Stage channels.
    pub embed_dims: [usize; 4],
    /// Blocks per stage.
    pub depths: [usize; 4],
    /// Heads per stage.
    pub num_heads: [usize; 4],
    /// MLP ratios.
    pub mlp_ratios: [usize; 4],
    /// Group tokens.
    pub num_groups: usize,
    /// Token-mixing hidden ratio.
    pub mixer_ratio: usize,
    /// Attention biases.
    pub qkv_bias: bool,
    /// Patch embedding kind.
    pub patch_embed: McgaPatchEmbed,
    /// Cross-attention key/value projections.
    pub cross_kv: McgaCrossKv,
    /// Branch fusion.
    pub fusion: McgaFusion,
    /// Classifier classes (0 = none).
    pub num_classes: usize,
    /// Classifier hidden width (0 = none).
    pub head_hidden: usize,
    /// Final stochastic-depth rate.
    pub drop_path_rate: f64,
    /// Returned stages.
    pub out_indices: Vec<usize>,
    /// Frozen stages (−1 = none).
    pub frozen_stages: i64,
}

fn four(v: &[usize], field: &str) -> std::result::Result<[usize; 4], String> {
    v.try_into()
        .map_err(|_| format!("MCGA: `{field}` needs 4 values (one per stage), got {v:?}"))
}

impl McgaConfig {
    /// Applies the preset (`tiny` when none is given) and checks consistency.
    ///
    /// Errors: lists without 4 entries, channels not divisible by their heads, zero groups,
    /// out-of-range `out_indices`.
    pub fn resolve(&self) -> std::result::Result<McgaParams, String> {
        let pick = |v: &Option<Vec<usize>>, field: &str, d: [usize; 4]| match v {
            Some(v) => four(v, field),
            None => Ok(d),
        };
        let embed_dims = pick(&self.embed_dims, "embed_dims", [32, 64, 128, 256])?;
        let num_heads = pick(&self.num_heads, "num_heads", [2, 2, 4, 8])?;
        for i in 0..4 {
            if num_heads[i] == 0 || embed_dims[i] % num_heads[i] != 0 {
                return Err(format!(
                    "MCGA: stage {i}: embed_dims {} is not divisible by num_heads {}",
                    embed_dims[i], num_heads[i]
                ));
            }
        }
        let num_groups = self.num_groups.unwrap_or(8);
        if num_groups == 0 {
            return Err("MCGA: `num_groups` must be at least 1".into());
        }
        let out_indices = self.out_indices.clone().unwrap_or(vec![0, 1, 2, 3]);
        if out_indices.is_empty() || out_indices.iter().any(|&i| i > 3) {
            return Err(format!(
                "MCGA: `out_indices` must list stages 0..=3, got {out_indices:?}"
            ));
        }
        Ok(McgaParams {
            embed_dims,
            depths: pick(&self.depths, "depths", [2, 2, 6, 6])?,
            num_heads,
            mlp_ratios: pick(&self.mlp_ratios, "mlp_ratios", [4; 4])?,
            num_groups,
            mixer_ratio: self.mixer_ratio.unwrap_or(4).max(1),
            qkv_bias: self.qkv_bias.unwrap_or(true),
            patch_embed: self.patch_embed.unwrap_or_default(),
            cross_kv: self.cross_kv.unwrap_or_default(),
            fusion: self.fusion.unwrap_or_default(),
            num_classes: self.num_classes.unwrap_or(0),
            head_hidden: self.head_hidden.unwrap_or(1280),
            drop_path_rate: self.drop_path_rate.unwrap_or(0.0),
            out_indices,
            frozen_stages: self.frozen_stages.unwrap_or(-1),
        })
    }
}

fn trunc_normal() -> Init {
    // N(0, 0.02²): the ViT-family init; its ±2 truncation never triggers at this std.
    Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

fn linear(vb: VarBuilder, i: usize, o: usize, bias: bool) -> Result<Linear> {
    Linear::with_init(vb, i, o, bias, trunc_normal())
}

/// A depthwise "same" conv on tokens: `weight` `(C, 1, k, k)`, `bias` `(C,)` (named as
/// `nn.Conv2d(C, C, k, groups=C)`).
struct TokenDw {
    weight: Tensor,
    bias: Tensor,
}

impl TokenDw {
    fn new(vb: VarBuilder, c: usize, k: usize) -> Result<Self> {
        let std = (2.0 / (k * k) as f64).sqrt(); // fan-out init of a depthwise conv
        Ok(Self {
            weight: vb.get_with_hints(
                (c, 1, k, k),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
        flops::count_token_dwconv(x, self.weight.dim(2)?);
        token_dwconv(x, &self.weight, &self.bias, hw, LocalMode::Plain)
    }
}

/// The spatial MLP-Mixer layer over the group axis: `M + fc2(GELU(fc1(LN(M)ᵀ)))ᵀ`.
struct Mixer {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Mixer {
    fn forward(&self, m: &Tensor) -> Result<Tensor> {
        let t = self.norm.forward(m)?.transpose(1, 2)?.contiguous()?; // (B, d, G)
        let h = self.fc2.forward(&gelu(&self.fc1.forward(&t)?)?)?;
        m + h.transpose(1, 2)?
    }
}

/// The MCGA attention (module doc, steps 1–5).
struct McgaAttention {
    heads: usize,
    scale: f64,
    group_tokens: Tensor,
    q_g: Linear,
    kv_i: Linear,
    local3: TokenDw,
    local5: TokenDw,
    mixer: Mixer,
    /// `[kv3, kv5]` or `[kv_m]`.
    kv_m: Vec<Linear>,
    /// `[proj3, proj5]` or `[proj]`.
    proj: Vec<Linear>,
}

impl McgaAttention {
    fn new(vb: VarBuilder, d: usize, heads: usize, p: &McgaParams) -> Result<Self> {
        let g = p.num_groups;
        let b = p.qkv_bias;
        let kv_m = match p.cross_kv {
            McgaCrossKv::Separate => vec![
                linear(vb.pp("kv3"), d, 2 * d, b)?,
                linear(vb.pp("kv5"), d, 2 * d, b)?,
            ],
            McgaCrossKv::Shared => vec![linear(vb.pp("kv_m"), d, 2 * d, b)?],
        };
        let proj = match p.fusion {
            McgaFusion::PerBranch => vec![
                linear(vb.pp("proj3"), d, d, true)?,
                linear(vb.pp("proj5"), d, d, true)?,
            ],
            McgaFusion::AfterSum => vec![linear(vb.pp("proj"), d, d, true)?],
        };
        let hidden = g * p.mixer_ratio;
        Ok(Self {
            heads,
            scale: 1.0 / ((d / heads) as f64).sqrt(),
            group_tokens: vb.get_with_hints((g, d), "group_tokens", trunc_normal())?,
            q_g: linear(vb.pp("q_g"), d, d, b)?,
            kv_i: linear(vb.pp("kv_i"), d, 2 * d, b)?,
            local3: TokenDw::new(vb.pp("local3"), d, 3)?,
            local5: TokenDw::new(vb.pp("local5"), d, 5)?,
            mixer: Mixer {
                norm: LayerNorm::new(vb.pp("mixer").pp("norm"), d, 1e-6)?,
                fc1: linear(vb.pp("mixer").pp("fc1"), g, hidden, true)?,
                fc2: linear(vb.pp("mixer").pp("fc2"), hidden, g, true)?,
            },
            kv_m,
            proj,
        })
    }

    /// `x` `(B, L, d)` (already normalised) → `(B, L, d)`.
    fn forward(&self, x: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (g, d) = self.group_tokens.dims2()?;
        // 2. group attention: (B, G, d).
        let q = self
            .q_g
            .forward(&self.group_tokens)?
            .unsqueeze(0)?
            .broadcast_as((b, g, d))?
            .contiguous()?;
        let kv_i = self.kv_i.forward(x)?;
        flops::count_token_attention(&q, &kv_i);
        let ga = token_attention(&q, &kv_i, self.heads, self.scale)?;
        // 3. token mixing over the groups.
        let m = self.mixer.forward(&ga)?;
        // 1. + 4. local queries attend the mixed groups.
        let q3 = self.local3.forward(x, hw)?;
        let q5 = self.local5.forward(x, hw)?;
        let kv3 = self.kv_m[0].forward(&m)?;
        let kv5 = match self.kv_m.get(1) {
            Some(l) => l.forward(&m)?,
            None => kv3.clone(),
        };
        flops::count_token_attention(&q3, &kv3);
        flops::count_token_attention(&q5, &kv5);
        let o3 = token_attention(&q3, &kv3, self.heads, self.scale)?;
        let o5 = token_attention(&q5, &kv5, self.heads, self.scale)?;
        // 5. fusion.
        match self.proj.as_slice() {
            [p3, p5] => p3.forward(&o3)? + p5.forward(&o5)?,
            [p] => p.forward(&(o3 + o5)?),
            _ => unreachable!("one or two projections by construction"),
        }
    }
}

/// `fc2(GELU(fc1(x)))`, hidden `ratio · d`.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

/// `X + MCGA(LN(X))`, then `X + MLP(LN(X))`, each branch through stochastic depth.
struct Block {
    norm1: LayerNorm,
    attn: McgaAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: DropPath,
}

impl Block {
    fn forward(&self, x: &Tensor, hw: (usize, usize), train: bool) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, hw)?;
        let x = (x + self.drop_path.forward(&a, train)?)?;
        let h = self.norm2.forward(&x)?;
        let m = self.mlp.fc2.forward(&gelu(&self.mlp.fc1.forward(&h)?)?)?;
        x + self.drop_path.forward(&m, train)?
    }
}

/// Conv (per [`McgaPatchEmbed`]) then LayerNorm on the tokens.
struct PatchEmbed {
    proj: Conv2d,
    norm: LayerNorm,
}

impl PatchEmbed {
    /// `(B, C_in, H, W)` → tokens `(B, H'·W', C)` and `(H', W')`.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let y = self.proj.forward(x)?;
        let (b, c, h, w) = y.dims4()?;
        let t = y.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        Ok((self.norm.forward(&t)?, (h, w)))
    }
}

struct Stage {
    embed: PatchEmbed,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

struct Head {
    fc1: Linear,
    fc2: Option<Linear>,
}

/// The MCGA network.
pub struct Mcga {
    stages: Vec<Stage>,
    head: Option<Head>,
    params: McgaParams,
}

impl Mcga {
    /// Builds the network under `vb` (`patch_embed{i}.{proj,norm}`, `block{i}.{j}.*`,
    /// `norm{i}`, `head.*`; `i` 1-based as PVT / SMT name them).
    ///
    /// Errors: an inconsistent configuration ([`McgaConfig::resolve`]), a stored parameter of
    /// the wrong shape.
    pub fn new(vb: VarBuilder, cfg: &McgaConfig) -> Result<Self> {
        let p = cfg.resolve().map_err(candle_core::Error::msg)?;
        let total: usize = p.depths.iter().sum();
        let mut stages = Vec::with_capacity(4);
        let mut cur = 0;
        for i in 0..4 {
            let d = p.embed_dims[i];
            let cin = if i == 0 { 3 } else { p.embed_dims[i - 1] };
            let (k, s, pad) = match (p.patch_embed, i) {
                (McgaPatchEmbed::Overlapping, 0) => (7, 4, 3),
                (McgaPatchEmbed::Overlapping, _) => (3, 2, 1),
                (McgaPatchEmbed::Patchify, 0) => (4, 4, 0),
                (McgaPatchEmbed::Patchify, _) => (2, 2, 0),
            };
            let pe = vb.pp(format!("patch_embed{}", i + 1));
            let cfg = ConvCfg {
                stride: s,
                padding: pad,
                ..Default::default()
            };
            let fan_out = (k * k * d) as f64;
            let embed = PatchEmbed {
                proj: Conv2d::with_init(
                    pe.pp("proj"),
                    cin,
                    d,
                    k,
                    cfg,
                    true,
                    Init::Randn {
                        mean: 0.0,
                        stdev: (2.0 / fan_out).sqrt(),
                    },
                )?,
                norm: LayerNorm::new(pe.pp("norm"), d, 1e-6)?,
            };
            let blocks = (0..p.depths[i])
                .map(|j| {
                    let bv = vb.pp(format!("block{}", i + 1)).pp(j);
                    let hidden = d * p.mlp_ratios[i];
                    Ok(Block {
                        norm1: LayerNorm::new(bv.pp("norm1"), d, 1e-6)?,
                        attn: McgaAttention::new(bv.pp("attn"), d, p.num_heads[i], &p)?,
                        norm2: LayerNorm::new(bv.pp("norm2"), d, 1e-6)?,
                        mlp: Mlp {
                            fc1: linear(bv.pp("mlp").pp("fc1"), d, hidden, true)?,
                            fc2: linear(bv.pp("mlp").pp("fc2"), hidden, d, true)?,
                        },
                        drop_path: DropPath {
                            p: drop_path_rate(p.drop_path_rate, cur + j, total),
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            cur += p.depths[i];
            stages.push(Stage {
                embed,
                blocks,
                norm: LayerNorm::new(vb.pp(format!("norm{}", i + 1)), d, 1e-6)?,
            });
        }
        let head = match (p.num_classes, p.head_hidden) {
            (0, _) => None,
            (n, 0) => Some(Head {
                fc1: linear(vb.pp("head").pp("fc"), p.embed_dims[3], n, true)?,
                fc2: None,
            }),
            (n, h) => Some(Head {
                fc1: linear(vb.pp("head").pp("fc1"), p.embed_dims[3], h, true)?,
                fc2: Some(linear(vb.pp("head").pp("fc2"), h, n, true)?),
            }),
        };
        Ok(Self {
            stages,
            head,
            params: p,
        })
    }

    /// The resolved hyper-parameters.
    pub fn params(&self) -> &McgaParams {
        &self.params
    }

    /// The four stage outputs `(B, C_i, H_i, W_i)` (after each stage's LayerNorm; strides 4, 8,
    /// 16, 32 with the default patch embedding: `H_1 = floor((H − 1)/4) + 1`, then
    /// `floor((H_i − 1)/2) + 1`).
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(4);
        let mut x = x.clone();
        for (i, st) in self.stages.iter().enumerate() {
            let frozen = (i as i64) <= self.params.frozen_stages;
            let train_stage = train && !frozen;
            let (mut t, (h, w)) = st.embed.forward(&x)?;
            for b in &st.blocks {
                t = b.forward(&t, (h, w), train_stage)?;
            }
            let t = st.norm.forward(&t)?;
            let (bsz, _, c) = t.dims3()?;
            x = t.transpose(1, 2)?.reshape((bsz, c, h, w))?.contiguous()?;
            if frozen {
                x = x.detach();
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// ImageNet logits `(B, num_classes)` from the stage-4 map: spatial mean, then the head.
    ///
    /// Errors: built with `num_classes = 0`.
    pub fn classify(&self, stage4: &Tensor) -> Result<Tensor> {
        let h = self.head.as_ref().ok_or_else(|| {
            candle_core::Error::msg("MCGA: built without a classifier (num_classes = 0)")
        })?;
        let pooled = stage4.flatten_from(2)?.mean(D::Minus1)?;
        let y = h.fc1.forward(&pooled)?;
        match &h.fc2 {
            Some(fc2) => fc2.forward(&gelu(&y)?),
            None => Ok(y),
        }
    }

    /// Whether the model has a classifier.
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }
}

impl Backbone for Mcga {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let all = self.forward_stages(x, train)?;
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

/// Checkpoint keys are densepred's own (no official checkpoint exists): strips a leading
/// `backbone.` (detector / segmentor checkpoints).
pub fn map_checkpoint_key(key: &str) -> String {
    key.strip_prefix("backbone.").unwrap_or(key).to_string()
}
