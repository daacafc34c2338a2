//! Layers with PyTorch semantics and PyTorch parameter names (`weight`, `bias`, `running_mean`,
//! `running_var`), built through candle-nn's `VarBuilder`. Initialisers follow the official SMT code
//! (`_init_weights`: Linear `trunc_normal(std=.02)`, Conv2d `normal(0, sqrt(2 / fan_out))`,
//! norms weight 1 / bias 0); checkpoints overwrite them.

use crate::ops::{
    add_bias_channels, depthwise_conv2d, layer_norm, mul_scale_channels, DwConvParams,
};
use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// Conv2d hyper-parameters (square kernel; `(h, w)`-equal stride, padding and dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvCfg {
    /// Stride in input pixels.
    pub stride: usize,
    /// Zero padding on each side, in input pixels.
    pub padding: usize,
    /// Dilation of the kernel taps.
    pub dilation: usize,
    /// Number of channel groups (`in_channels` for a depthwise convolution).
    pub groups: usize,
}

impl Default for ConvCfg {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// 2-D convolution, `torch.nn.Conv2d` semantics: input `(B, C_in, H, W)` → `(B, C_out, OH, OW)`.
///
/// Parameters: `weight` `(C_out, C_in / groups, K, K)`, optional `bias` `(C_out,)`.
/// Dispatch: depthwise (`groups == C_in == C_out`) goes to [`depthwise_conv2d`]; 1x1 stride-1
/// convolutions (dense or grouped) become one batched matmul; other dense convolutions are
/// im2col + GEMM ([`crate::ops::conv2d_gemm`], whose gradients are GEMMs too); grouped ones are
/// candle's `conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `(C_out, C_in / groups, K, K)`.
    pub weight: Tensor,
    /// `(C_out,)`.
    pub bias: Option<Tensor>,
    /// Stride / padding / dilation / groups.
    pub cfg: ConvCfg,
}

impl Conv2d {
    /// Creates (or fetches from `vb`) `weight` and, if `bias`, `bias`.
    ///
    /// Errors: `in_c` or `out_c` not divisible by `cfg.groups`; a stored parameter of another shape.
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        k: usize,
        cfg: ConvCfg,
        bias: bool,
    ) -> Result<Self> {
        if cfg.groups == 0 {
            candle_core::bail!("Conv2d {}: groups must be at least 1", vb.prefix());
        }
        let fan_out = (k * k * out_c / cfg.groups) as f64;
        let init = Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out).sqrt(),
        };
        Self::with_init(vb, in_c, out_c, k, cfg, bias, init)
    }

    /// As [`Conv2d::new`] with the weight drawn from `init` (e.g. the N(0, 0.02²) of a model
    /// whose official `_init_weights` uses `trunc_normal_(std=.02)`); biases start at 0.
    ///
    /// Errors: as [`Conv2d::new`].
    pub fn with_init(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        k: usize,
        cfg: ConvCfg,
        bias: bool,
        init: Init,
    ) -> Result<Self> {
        if cfg.groups == 0 || in_c % cfg.groups != 0 || out_c % cfg.groups != 0 {
            candle_core::bail!(
                "Conv2d {}: channels {in_c}->{out_c} not divisible by groups {}",
                vb.prefix(),
                cfg.groups
            );
        }
        let weight = vb.get_with_hints((out_c, in_c / cfg.groups, k, k), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_c, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias, cfg })
    }

    /// `(B, C_in, H, W)` → `(B, C_out, OH, OW)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// `relu(conv(x))`, `(B, C_in, H, W)` → `(B, C_out, OH, OW)`: mmcv's `ConvModule` without a
    /// norm layer. A dense convolution with a bias runs as one op that keeps only its output
    /// ([`crate::ops::conv2d_gemm_bias_act`]); the others are [`Conv2d::forward`] then `relu`.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }

    fn forward_act(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let y = self.forward_uncounted(x, relu)?;
        if crate::flops::active() {
            let (_, in_per_g, k, _) = self.weight.dims4()?;
            crate::flops::count("conv", (y.elem_count() * in_per_g * k * k) as u64);
        }
        Ok(y)
    }

    fn forward_uncounted(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        if let (1, Some(b)) = (self.cfg.groups, &self.bias) {
            let (_, in_per_g, k, _) = self.weight.dims4()?;
            let pointwise = k == 1 && self.cfg.stride == 1 && self.cfg.padding == 0;
            if !pointwise && x.dim(1)? == in_per_g {
                let c = self.cfg;
                return crate::ops::conv2d_gemm_bias_act(
                    x,
                    &self.weight,
                    b,
                    (c.stride, c.padding, c.dilation),
                    relu,
                );
            }
        }
        let y = self.forward_linear(x)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn forward_linear(&self, x: &Tensor) -> Result<Tensor> {
        let (out_c, in_per_g, k, _) = self.weight.dims4()?;
        let c = self.cfg;
        let in_c = x.dim(1)?;
        if in_c != in_per_g * c.groups {
            candle_core::bail!(
                "Conv2d: input has {in_c} channels, weight expects {}",
                in_per_g * c.groups
            );
        }
        if c.groups == in_c && in_per_g == 1 && out_c == in_c {
            let p = DwConvParams {
                stride: (c.stride, c.stride),
                padding: (c.padding, c.padding),
                dilation: (c.dilation, c.dilation),
            };
            return depthwise_conv2d(x, &self.weight, self.bias.as_ref(), p);
        }
        if k == 1 && c.stride == 1 && c.padding == 0 {
            let (b, _, h, wd) = x.dims4()?;
            let wg = self
                .weight
                .reshape((c.groups, out_c / c.groups, in_per_g))?;
            let x3 = x.reshape((b, in_c, h * wd))?;
            return crate::ops::bias::pointwise_conv_bias(&x3, &wg, self.bias.as_ref())?
                .reshape((b, out_c, h, wd));
        }
        let y = strided_conv2d(x, &self.weight, c)?;
        match &self.bias {
            Some(b) => add_bias_channels(&y, b),
            None => Ok(y),
        }
    }
}

impl Conv2d {
    /// [`Conv2d::forward`] of the channel concatenation of `xs` (each `(B, C_j, H, W)`,
    /// `Σ C_j = C_in`): dense convolutions run part by part
    /// ([`crate::ops::conv2d_gemm_cat`]) without building the concatenation where our kernel
    /// runs; other cases concatenate and call [`Conv2d::forward`].
    ///
    /// Errors: channel counts that do not add up to `C_in`; candle errors.
    pub fn forward_cat(&self, xs: &[Tensor]) -> Result<Tensor> {
        self.cat_conv(xs, None)
    }

    /// [`Conv2d::forward_cat`] of the parts each resized bilinearly to `size = (H, W)` first
    /// ([`crate::ops::resize_bilinear`]); dense convolutions resize inside the op
    /// ([`crate::ops::conv2d_gemm_cat_resized`]), so the resized parts are not kept.
    ///
    /// Errors: as [`Conv2d::forward_cat`], plus the resize errors.
    pub fn forward_cat_resized(
        &self,
        xs: &[Tensor],
        size: (usize, usize),
        align_corners: bool,
    ) -> Result<Tensor> {
        self.cat_conv(xs, Some((size, align_corners)))
    }

    fn cat_conv(&self, xs: &[Tensor], resize: Option<((usize, usize), bool)>) -> Result<Tensor> {
        let c = self.cfg;
        let k = self.weight.dim(2)?;
        let dense = c.groups == 1 && k > 1 && !xs.is_empty();
        if !dense {
            let parts = match resize {
                Some(((h, w), ac)) => xs
                    .iter()
                    .map(|x| crate::ops::resize_bilinear(x, h, w, ac))
                    .collect::<Result<Vec<_>>>()?,
                None => xs.to_vec(),
            };
            return self.forward(&Tensor::cat(&parts, 1)?);
        }
        let (s, p, d) = (c.stride, c.padding, c.dilation);
        let y = match resize {
            Some((size, ac)) => {
                crate::ops::conv2d_gemm_cat_resized(xs, size, ac, &self.weight, s, p, d)?
            }
            None => crate::ops::conv2d_gemm_cat(xs, &self.weight, s, p, d)?,
        };
        match &self.bias {
            Some(b) => add_bias_channels(&y, b),
            None => Ok(y),
        }
    }
}

/// A dense convolution ([`crate::ops::conv2d_gemm`]) or a grouped one (candle's `conv2d`,
/// through [`crate::ops::im2col::candle_conv2d`]).
fn strided_conv2d(x: &Tensor, w: &Tensor, c: ConvCfg) -> Result<Tensor> {
    if c.groups == 1 {
        return crate::ops::conv2d_gemm(x, w, c.stride, c.padding, c.dilation);
    }
    crate::ops::im2col::candle_conv2d(x, w, c.stride, c.padding, c.dilation, c.groups)
}

/// Fully connected layer, `torch.nn.Linear`: `(..., in)` → `(..., out)`, `y = x Wᵀ + b`.
/// Parameters `weight` `(out, in)`, optional `bias` `(out,)`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `(out, in)`.
    pub weight: Tensor,
    /// `(out,)`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Creates (or fetches) `weight` (init N(0, 0.02²), the official `trunc_normal_(std=.02)` up to
    /// the ±2 truncation, which never triggers at that std) and `bias` (zeros).
    pub fn new(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool) -> Result<Self> {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Self::with_init(vb, in_f, out_f, bias, init)
    }

    /// As [`Linear::new`] with the weight drawn from `init` (e.g. mmdetection's Xavier-uniform
    /// shared FCs or N(0, 0.01²) classifiers); the bias starts at 0.
    pub fn with_init(
        vb: VarBuilder,
        in_f: usize,
        out_f: usize,
        bias: bool,
        init: Init,
    ) -> Result<Self> {
        let w = vb.get_with_hints((out_f, in_f), "weight", init)?;
        let b = if bias {
            Some(vb.get_with_hints(out_f, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight: w, bias: b })
    }

    /// `(..., in)` → `(..., out)`. Computed as one 2-D matmul over all rows (no weight broadcast
    /// over the batch, whose gradient candle would reduce slowly).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_f = *dims
            .last()
            .ok_or_else(|| candle_core::Error::msg("Linear: scalar input"))?;
        if crate::flops::active() {
            let rows = x.elem_count() / in_f.max(1);
            crate::flops::count("linear", (rows * in_f * self.weight.dim(0)?) as u64);
        }
        if let Some(b) = &self.bias {
            // Any rank, without reshape nodes in the graph.
            return crate::ops::bias::linear_bias(x, &self.weight, b);
        }
        let rows = x.elem_count() / in_f.max(1);
        let y = x.reshape((rows, in_f))?.matmul(&self.weight.t()?)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// LayerNorm over the last dimension, `torch.nn.LayerNorm(C, eps)`: `(..., C)` → `(..., C)`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `(C,)`, init 1.
    pub weight: Tensor,
    /// `(C,)`, init 0.
    pub bias: Tensor,
    /// Added to the (biased) variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Creates (or fetches) `weight` and `bias` of length `c`.
    pub fn new(vb: VarBuilder, c: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// `(..., C)` → `(..., C)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::flops::count("layer_norm", 5 * x.elem_count() as u64);
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// BatchNorm over the channels of `(B, C, H, W)`, `torch.nn.BatchNorm2d(C, eps, momentum=0.1)`.
///
/// Evaluation uses the running statistics; training normalises with the batch statistics (biased
/// variance) and updates `running_mean` / `running_var` (unbiased variance) in place, as PyTorch.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// `(C,)`, init 1.
    pub weight: Tensor,
    /// `(C,)`, init 0.
    pub bias: Tensor,
    /// `(C,)` buffer, init 0.
    pub running_mean: Tensor,
    /// `(C,)` buffer, init 1.
    pub running_var: Tensor,
    /// Added to the variance (PyTorch default 1e-5).
    pub eps: f64,
    /// Running-statistics update factor (PyTorch default 0.1).
    pub momentum: f64,
    /// SyncBN (`norm_cfg.type = "SyncBN"`): in training, the statistics of the whole
    /// data-parallel batch, over the group of [`set_sync_bn_group`] (plain BN when none is set:
    /// one process).
    pub sync: bool,
}

static SYNC_BN_GROUP: std::sync::RwLock<Option<crate::ops::batch_norm::AllReduceSum>> =
    std::sync::RwLock::new(None);

/// Sets the process group that SyncBN layers reduce their statistics over (the engine sets it
/// when a data-parallel run starts; `None`, the default, makes SyncBN plain BN), as
/// `torch.distributed`'s default group serves `nn.SyncBatchNorm`.
pub fn set_sync_bn_group(group: Option<crate::ops::batch_norm::AllReduceSum>) {
    *SYNC_BN_GROUP.write().unwrap_or_else(|e| e.into_inner()) = group;
}

fn sync_bn_group() -> Option<crate::ops::batch_norm::AllReduceSum> {
    SYNC_BN_GROUP
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

impl BatchNorm2d {
    /// Creates (or fetches) the affine parameters and running statistics of `c` channels.
    pub fn new(vb: VarBuilder, c: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(c, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(c, "running_var", Init::Const(1.0))?,
            eps,
            momentum: 0.1,
            sync: false,
        })
    }

    /// The same layer as SyncBN (`sync = true`) or BN.
    pub fn synced(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// `(B, C, H, W)` → `(B, C, H, W)`; `train` selects batch statistics and updates the buffers.
    ///
    /// Errors: a batch with a single value per channel in training (variance undefined).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.count(x, train);
        self.forward_act(x, train, false)
    }

    /// fvcore's count: `2·numel` in evaluation, `5·numel` in training.
    fn count(&self, x: &Tensor, train: bool) {
        let per = if train { 5 } else { 2 };
        crate::flops::count("batch_norm", per * x.elem_count() as u64);
    }

    /// `relu(self.forward(x, train))` (conv → BN → ReLU of mmcv's `ConvModule`); in training on
    /// the CPU one fused op ([`crate::ops::batch_norm_relu_train`]) that keeps one tensor fewer
    /// for the backward.
    ///
    /// Errors: as [`BatchNorm2d::forward`].
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.count(x, train);
        self.forward_act(x, train, true)
    }

    fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !train {
            if relu {
                return self.forward_act(x, false, false)?.relu();
            }
            let scale = (&self.weight / (&self.running_var + self.eps)?.sqrt()?)?;
            let shift = (&self.bias - (&self.running_mean * &scale)?)?;
            return add_bias_channels(&mul_scale_channels(x, &scale)?, &shift);
        }
        let group = if self.sync { sync_bn_group() } else { None };
        let (y, mean, var, count) = crate::ops::batch_norm::batch_norm_train_synced(
            x,
            &self.weight,
            &self.bias,
            self.eps,
            relu,
            group.as_ref(),
        )?;
        if self.running_mean.is_variable() {
            let m = self.momentum;
            let dev = x.device();
            let mean = Tensor::new(mean, dev)?.to_dtype(self.running_mean.dtype())?;
            let var_unbiased = (Tensor::new(var, dev)? * (count / (count - 1.0)))?
                .to_dtype(self.running_var.dtype())?;
            let rm = ((&self.running_mean * (1.0 - m))? + (mean * m)?)?;
            let rv = ((&self.running_var * (1.0 - m))? + (var_unbiased * m)?)?;
            Var::from_tensor(&self.running_mean)?.set(&rm)?;
            Var::from_tensor(&self.running_var)?.set(&rv)?;
        }
        Ok(y)
    }
}

/// Stochastic depth per sample (Huang et al. 2016; timm's `DropPath`): in training each sample's
/// residual branch is zeroed with probability `p` and the kept ones are scaled by `1 / (1 - p)`.
/// Identity in evaluation or when `p == 0`. Draws from [`crate::rng`].
#[derive(Debug, Clone, Copy)]
pub struct DropPath {
    /// Drop probability in `[0, 1)`.
    pub p: f64,
}

impl DropPath {
    /// `x` `(B, ...)` → same shape.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let b = x.dim(0)?;
        let mask: Vec<f32> = crate::rng::with_rng(|r| {
            (0..b)
                .map(|_| {
                    if rand::Rng::random::<f64>(r) < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        });
        let mut shape = vec![1usize; x.rank()];
        shape[0] = b;
        let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&mask)
    }
}

/// Stochastic-depth rate of block `i` of `total` when the rates rise linearly from 0 to `rate`
/// (`torch.linspace(0, rate, total)[i]`, the timm / official-backbone convention).
pub fn drop_path_rate(rate: f64, i: usize, total: usize) -> f64 {
    if total > 1 {
        rate * i as f64 / (total - 1) as f64
    } else {
        0.0
    }
}

/// Exact (erf) GELU, `torch.nn.GELU()` default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    crate::ops::gelu_erf(x)
}
