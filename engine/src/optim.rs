//! Optimizers with mmengine's `optim_wrapper` semantics: AdamW and SGD (PyTorch's update rules),
//! parameter-wise multipliers (`paramwise_cfg`), gradient clipping by global norm and gradient
//! accumulation.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use densepred_core::config::defaults as d;
use densepred_core::params::is_buffer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn eps8() -> f64 {
    1e-8
}
fn wd_adamw() -> f64 {
    0.01
}
fn wrapper() -> String {
    "OptimWrapper".into()
}

/// `optim_wrapper.optimizer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Decoupled weight decay Adam (Loshchilov & Hutter 2019), `torch.optim.AdamW`.
    AdamW {
        /// Base learning rate.
        lr: f64,
        /// `(β1, β2)`.
        #[serde(default = "betas")]
        betas: [f64; 2],
        /// Added to the denominator.
        #[serde(default = "eps8")]
        eps: f64,
        /// Decoupled decay factor.
        #[serde(default = "wd_adamw")]
        weight_decay: f64,
    },
    /// `torch.optim.SGD` with momentum and L2 weight decay.
    #[serde(rename = "SGD")]
    Sgd {
        /// Base learning rate.
        lr: f64,
        /// Momentum factor.
        #[serde(default)]
        momentum: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
        /// Nesterov momentum.
        #[serde(default)]
        nesterov: bool,
    },
}

impl OptimizerConfig {
    /// Base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::AdamW { lr, .. } | Self::Sgd { lr, .. } => *lr,
        }
    }

    /// Sets the base learning rate (`auto_scale_lr`).
    pub fn set_lr(&mut self, v: f64) {
        match self {
            Self::AdamW { lr, .. } | Self::Sgd { lr, .. } => *lr = v,
        }
    }

    fn weight_decay(&self) -> f64 {
        match self {
            Self::AdamW { weight_decay, .. } | Self::Sgd { weight_decay, .. } => *weight_decay,
        }
    }
}

/// One `custom_keys` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyMult {
    /// Learning-rate multiplier.
    #[serde(default = "d::one_f64")]
    pub lr_mult: f64,
    /// Weight-decay multiplier.
    #[serde(default = "d::one_f64")]
    pub decay_mult: f64,
}

/// `optim_wrapper.paramwise_cfg` (mmengine's `DefaultOptimWrapperConstructor`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamwiseConfig {
    /// Multipliers for parameters whose name contains the key; the longest matching key wins
    /// (ties: alphabetical), as mmengine.
    #[serde(default)]
    pub custom_keys: BTreeMap<String, KeyMult>,
    /// Weight-decay multiplier of biases (not of norms).
    #[serde(default)]
    pub bias_decay_mult: Option<f64>,
    /// Weight-decay multiplier of normalisation weights and biases.
    #[serde(default)]
    pub norm_decay_mult: Option<f64>,
    /// Weight-decay multiplier of depthwise conv weights.
    #[serde(default)]
    pub dwconv_decay_mult: Option<f64>,
    /// Learning-rate multiplier of biases.
    #[serde(default)]
    pub bias_lr_mult: Option<f64>,
    /// mmengine skips parameters listed twice; every model parameter here has one name, so
    /// either value builds the same groups.
    #[serde(default)]
    pub bypass_duplicate: bool,
}

/// `optim_wrapper.clip_grad`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipGradConfig {
    /// Largest allowed global gradient norm.
    pub max_norm: f64,
    /// Only 2.
    #[serde(default = "d::two_f64")]
    pub norm_type: f64,
}

/// `optim_wrapper`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimWrapperConfig {
    /// `"OptimWrapper"` (`"AmpOptimWrapper"` is not supported).
    #[serde(rename = "type", default = "wrapper")]
    pub kind: String,
    /// The optimizer.
    pub optimizer: OptimizerConfig,
    /// Parameter-wise multipliers.
    #[serde(default)]
    pub paramwise_cfg: Option<ParamwiseConfig>,
    /// Gradient clipping.
    #[serde(default)]
    pub clip_grad: Option<ClipGradConfig>,
    /// Iterations whose gradients are summed before a step (the loss is divided by it).
    #[serde(default = "d::one_usize")]
    pub accumulative_counts: usize,
}

/// True for the weight / bias of a normalisation layer, recognised by the name of its module
/// (`norm`, `norm1`, `bn`, `gn`, `ln`, …), since the names follow the official implementations.
pub fn is_norm_param(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() < 2 {
        return false;
    }
    let module = parts[parts.len() - 2].trim_end_matches(|c: char| c.is_ascii_digit());
    matches!(
        module,
        "norm" | "bn" | "gn" | "ln" | "layer_norm" | "batch_norm" | "group_norm"
    )
}

/// One trainable parameter with its multipliers.
pub struct ParamEntry {
    /// Dotted name.
    pub name: String,
    /// The variable.
    pub var: Var,
    /// Learning-rate multiplier.
    pub lr_mult: f64,
    /// Weight-decay multiplier.
    pub decay_mult: f64,
}

/// Builds the parameter list with mmengine's multiplier rules: the longest `custom_keys` key
/// contained in the name (ties alphabetical) sets both multipliers; otherwise `norm_decay_mult`
/// for norms, `bias_decay_mult` / `bias_lr_mult` for other biases, `dwconv_decay_mult` for
/// depthwise weights (`dwconv_weights` lists their names). Buffers and `frozen` names are left out.
pub fn param_groups(
    vars: Vec<(String, Var)>,
    cfg: Option<&ParamwiseConfig>,
    frozen: &dyn Fn(&str) -> bool,
    dwconv_weights: &[String],
) -> Vec<ParamEntry> {
    let default = ParamwiseConfig::default();
    let cfg = cfg.unwrap_or(&default);
    let mut keys: Vec<&String> = cfg.custom_keys.keys().collect();
    keys.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    vars.into_iter()
        .filter(|(n, _)| !is_buffer(n) && !frozen(n))
        .map(|(name, var)| {
            let (mut lr_mult, mut decay_mult) = (1.0, 1.0);
            if let Some(k) = keys.iter().find(|k| name.contains(k.as_str())) {
                let m = &cfg.custom_keys[*k];
                lr_mult = m.lr_mult;
                decay_mult = m.decay_mult;
            } else if is_norm_param(&name) {
                decay_mult = cfg.norm_decay_mult.unwrap_or(1.0);
            } else if name.ends_with(".bias") {
                decay_mult = cfg.bias_decay_mult.unwrap_or(1.0);
                lr_mult = cfg.bias_lr_mult.unwrap_or(1.0);
            } else if dwconv_weights.contains(&name) {
                decay_mult = cfg.dwconv_decay_mult.unwrap_or(1.0);
            }
            ParamEntry {
                name,
                var,
                lr_mult,
                decay_mult,
            }
        })
        .collect()
}

/// Optimizer state and update (PyTorch's AdamW / SGD rules, f32 state per parameter).
pub struct Optimizer {
    cfg: OptimizerConfig,
    /// The parameters updated.
    pub params: Vec<ParamEntry>,
    /// Steps taken.
    pub step: u64,
    /// Per parameter: AdamW `(exp_avg, exp_avg_sq)`, SGD `(momentum_buffer, unused)`.
    state: Vec<Option<(Tensor, Tensor)>>,
}

impl Optimizer {
    /// An optimizer over `params`.
    pub fn new(cfg: OptimizerConfig, params: Vec<ParamEntry>) -> Self {
        let n = params.len();
        Self {
            cfg,
            params,
            step: 0,
            state: vec![None; n],
        }
    }

    /// The config (base lr).
    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Global L2 norm of the gradients in `grads` over the optimizer's parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut s = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                s += g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64;
            }
        }
        Ok(s.sqrt())
    }

    /// One update with learning rate `lr` (already scheduled) from `grads` multiplied by
    /// `grad_scale` (clipping). Parameters without a gradient are left unchanged (as PyTorch does
    /// for `grad is None`).
    ///
    /// Errors: candle errors.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let wd = self.cfg.weight_decay();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Gradients computed from tracked tensors carry their graph: detach, or the optimizer
            // state would keep every iteration's graph alive.
            let g = g.detach().contiguous()?;
            let lr_p = lr * p.lr_mult;
            let wd_p = wd * p.decay_mult;
            let w = &p.var.as_tensor().detach();
            match &self.cfg {
                OptimizerConfig::AdamW { betas, eps, .. } => {
                    let (b1, b2) = (betas[0], betas[1]);
                    let (m, v) = match self.state[i].take() {
                        Some(s) => s,
                        None => (w.zeros_like()?, w.zeros_like()?),
                    };
                    update::adamw(
                        p.var.as_tensor(),
                        &m,
                        &v,
                        &g,
                        update::AdamW {
                            lr: lr_p,
                            weight_decay: wd_p,
                            beta1: b1,
                            beta2: b2,
                            eps: *eps,
                            step: t,
                            grad_scale,
                        },
                    )?;
                    self.state[i] = Some((m, v));
                }
                OptimizerConfig::Sgd {
                    momentum, nesterov, ..
                } => {
                    let buf = if *momentum != 0.0 {
                        Some(match self.state[i].take() {
                            Some((b, _)) => b,
                            None => w.zeros_like()?,
                        })
                    } else {
                        None
                    };
                    update::sgd(
                        p.var.as_tensor(),
                        buf.as_ref(),
                        &g,
                        update::Sgd {
                            lr: lr_p,
                            weight_decay: wd_p,
                            momentum: *momentum,
                            nesterov: *nesterov,
                            grad_scale,
                        },
                    )?;
                    if let Some(buf) = buf {
                        let z = Tensor::zeros(0, DType::F32, buf.device())?;
                        self.state[i] = Some((buf, z));
                    }
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (`state.<param>.0|1`) for checkpoints, plus the step count.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (p, s) in self.params.iter().zip(&self.state) {
            if let Some((a, b)) = s {
                out.insert(format!("state.{}.0", p.name), a.clone());
                out.insert(format!("state.{}.1", p.name), b.clone());
            }
        }
        out.insert(
            "step".into(),
            Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores [`Self::state_tensors`].
    ///
    /// Errors: a state tensor whose shape differs from its parameter.
    pub fn load_state(&mut self, t: &BTreeMap<String, Tensor>) -> Result<()> {
        if let Some(s) = t.get("step") {
            self.step = s.to_dtype(DType::I64)?.to_vec1::<i64>()?[0] as u64;
        }
        for (p, s) in self.params.iter().zip(self.state.iter_mut()) {
            if let (Some(a), Some(b)) = (
                t.get(&format!("state.{}.0", p.name)),
                t.get(&format!("state.{}.1", p.name)),
            ) {
                if a.dims() != p.var.dims() {
                    candle_core::bail!(
                        "optimizer state of {}: shape {:?}, parameter {:?}",
                        p.name,
                        a.dims(),
                        p.var.dims()
                    );
                }
                let dev = p.var.device();
                *s = Some((a.to_device(dev)?, b.to_device(dev)?));
            }
        }
        Ok(())
    }
}

/// The optimizer updates as in-place kernels over the parameter, its state and its gradient:
/// a step allocates nothing (the state is created once, zero-filled). Re-allocating the state
/// and the temporaries of each update every step (as tensor expressions do) left ~1 GB of
/// scattered free memory in the process during UperNet-SMT-T training (BENCHMARKS.md).
mod update {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
    use num_traits::Float;

    /// One AdamW step's constants (`torch.optim.AdamW` semantics, `amsgrad = False`).
    #[derive(Debug, Clone, Copy)]
    pub(super) struct AdamW {
        pub lr: f64,
        pub weight_decay: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub eps: f64,
        /// The step number, from 1 (bias corrections `1 − βᵗ`).
        pub step: i32,
        /// Gradient multiplier (clipping by global norm), applied first.
        pub grad_scale: f64,
    }

    /// One SGD step's constants (`torch.optim.SGD`, `dampening = 0`).
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Sgd {
        pub lr: f64,
        pub weight_decay: f64,
        pub momentum: f64,
        pub nesterov: bool,
        /// Gradient multiplier (clipping by global norm), applied first.
        pub grad_scale: f64,
    }

    fn slice<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => candle_core::bail!("optimizer: {what} must be contiguous"),
        }
    }

    fn slice_mut<'a, T>(v: &'a mut [T], l: &Layout, what: &str) -> Result<&'a mut [T]> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&mut v[a..b]),
            None => candle_core::bail!("optimizer: {what} must be contiguous"),
        }
    }

    fn same_len(n: usize, others: &[(usize, &str)]) -> Result<()> {
        for (m, what) in others {
            if *m != n {
                candle_core::bail!("optimizer: {what} has {m} elements, the parameter {n}");
            }
        }
        Ok(())
    }

    /// `m ← m + (1 − β)(s·g − m)` (PyTorch's `lerp_`) or, with `square`,
    /// `v ← β·v + (1 − β)(s·g)²` (`mul_(β).addcmul_(g, g, 1 − β)`).
    struct Moment {
        beta: f64,
        square: bool,
        grad_scale: f64,
    }

    impl Moment {
        fn run<T: Float>(&self, m: &mut [T], g: &[T]) {
            let beta = T::from(self.beta).expect("float");
            let w = T::from(1.0 - self.beta).expect("float");
            let s = T::from(self.grad_scale).expect("float");
            let scaled = self.grad_scale != 1.0;
            for (m, &g) in m.iter_mut().zip(g) {
                let g = if scaled { g * s } else { g };
                *m = if self.square {
                    *m * beta + g * g * w
                } else {
                    *m + w * (g - *m)
                };
            }
        }
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "optimizer-moment"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            match (s1, s2) {
                (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                    let (m, g) = (slice_mut(m, l1, "state")?, slice(g, l2, "gradient")?);
                    same_len(m.len(), &[(g.len(), "gradient")])?;
                    self.run(m, g)
                }
                (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                    let (m, g) = (slice_mut(m, l1, "state")?, slice(g, l2, "gradient")?);
                    same_len(m.len(), &[(g.len(), "gradient")])?;
                    self.run(m, g)
                }
                (a, b) => candle_core::bail!(
                    "optimizer: state {:?} and gradient {:?} must be both f32 or both f64",
                    a.dtype(),
                    b.dtype()
                ),
            }
            Ok(())
        }
    }

    /// `p ← p(1 − lr·wd) − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)`.
    struct AdamParam(AdamW);

    impl AdamParam {
        fn run<T: Float>(&self, p: &mut [T], m: &[T], v: &[T]) {
            let a = &self.0;
            let bc1 = 1.0 - a.beta1.powi(a.step);
            let bc2 = 1.0 - a.beta2.powi(a.step);
            let decay = T::from(1.0 - a.lr * a.weight_decay).expect("float");
            let step_size = T::from(a.lr / bc1).expect("float");
            let bc2_sqrt = T::from(bc2.sqrt()).expect("float");
            let eps = T::from(a.eps).expect("float");
            let decays = a.weight_decay != 0.0;
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                let q = if decays { *p * decay } else { *p };
                *p = q - step_size * (m / (v.sqrt() / bc2_sqrt + eps));
            }
        }
    }

    impl InplaceOp3 for AdamParam {
        fn name(&self) -> &'static str {
            "adamw-update"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            match (s1, s2, s3) {
                (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                    let p = slice_mut(p, l1, "parameter")?;
                    let (m, v) = (slice(m, l2, "exp_avg")?, slice(v, l3, "exp_avg_sq")?);
                    same_len(p.len(), &[(m.len(), "exp_avg"), (v.len(), "exp_avg_sq")])?;
                    self.run(p, m, v)
                }
                (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                    let p = slice_mut(p, l1, "parameter")?;
                    let (m, v) = (slice(m, l2, "exp_avg")?, slice(v, l3, "exp_avg_sq")?);
                    same_len(p.len(), &[(m.len(), "exp_avg"), (v.len(), "exp_avg_sq")])?;
                    self.run(p, m, v)
                }
                _ => {
                    candle_core::bail!("optimizer: parameter, exp_avg and exp_avg_sq dtypes differ")
                }
            }
            Ok(())
        }
    }

    /// One AdamW step on `param` in place, with its state `m` (exp_avg) and `v` (exp_avg_sq)
    /// updated in place from `grad` (contiguous, same shape and dtype).
    ///
    /// Errors: dtype, length or contiguity mismatches.
    pub(super) fn adamw(
        param: &Tensor,
        m: &Tensor,
        v: &Tensor,
        grad: &Tensor,
        c: AdamW,
    ) -> Result<()> {
        m.inplace_op2(
            grad,
            &Moment {
                beta: c.beta1,
                square: false,
                grad_scale: c.grad_scale,
            },
        )?;
        v.inplace_op2(
            grad,
            &Moment {
                beta: c.beta2,
                square: true,
                grad_scale: c.grad_scale,
            },
        )?;
        param.inplace_op3(m, v, &AdamParam(c))
    }

    /// SGD: `d = s·g + wd·p`; with momentum `buf ← μ·buf + d` and `d = d + μ·buf` (Nesterov) or
    /// `d = buf`; then `p ← p − lr·d`. The first pass updates `buf` (reading `p` and `g`), the
    /// second `p` (reading `g` and the new `buf`).
    struct SgdOp {
        c: Sgd,
        /// true: update the momentum buffer (self = buf, a = g, b = p); false: the parameter
        /// (self = p, a = g, b = buf or g when there is no momentum).
        buffer: bool,
    }

    impl SgdOp {
        fn run<T: Float>(&self, dst: &mut [T], g: &[T], b: &[T]) {
            let c = &self.c;
            let s = T::from(c.grad_scale).expect("float");
            let wd = T::from(c.weight_decay).expect("float");
            let mu = T::from(c.momentum).expect("float");
            let lr = T::from(c.lr).expect("float");
            let decays = c.weight_decay != 0.0;
            let scaled = c.grad_scale != 1.0;
            let has_momentum = c.momentum != 0.0;
            for ((x, &g), &b) in dst.iter_mut().zip(g).zip(b) {
                let g = if scaled { g * s } else { g };
                if self.buffer {
                    // x = buf, b = p.
                    let d = if decays { g + wd * b } else { g };
                    *x = *x * mu + d;
                } else {
                    // x = p, b = buf (momentum) or unused.
                    let d = if decays { g + wd * *x } else { g };
                    let d = match (has_momentum, c.nesterov) {
                        (false, _) => d,
                        (true, true) => d + mu * b,
                        (true, false) => b,
                    };
                    *x = *x - lr * d;
                }
            }
        }
    }

    impl InplaceOp3 for SgdOp {
        fn name(&self) -> &'static str {
            "sgd-update"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            match (s1, s2, s3) {
                (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                    let x = slice_mut(x, l1, "parameter or momentum buffer")?;
                    let (g, b) = (
                        slice(g, l2, "gradient")?,
                        slice(b, l3, "parameter or momentum buffer")?,
                    );
                    same_len(
                        x.len(),
                        &[(g.len(), "gradient"), (b.len(), "momentum buffer")],
                    )?;
                    self.run(x, g, b)
                }
                (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                    let x = slice_mut(x, l1, "parameter or momentum buffer")?;
                    let (g, b) = (
                        slice(g, l2, "gradient")?,
                        slice(b, l3, "parameter or momentum buffer")?,
                    );
                    same_len(
                        x.len(),
                        &[(g.len(), "gradient"), (b.len(), "momentum buffer")],
                    )?;
                    self.run(x, g, b)
                }
                _ => candle_core::bail!(
                    "optimizer: parameter, gradient and momentum buffer dtypes differ"
                ),
            }
            Ok(())
        }
    }

    /// One SGD step on `param` in place (and on its momentum buffer `buf` when momentum ≠ 0).
    ///
    /// Errors: dtype, length or contiguity mismatches; momentum without a buffer.
    pub(super) fn sgd(param: &Tensor, buf: Option<&Tensor>, grad: &Tensor, c: Sgd) -> Result<()> {
        match buf {
            Some(buf) => {
                buf.inplace_op3(grad, param, &SgdOp { c, buffer: true })?;
                param.inplace_op3(grad, buf, &SgdOp { c, buffer: false })
            }
            None if c.momentum != 0.0 => {
                candle_core::bail!("optimizer: SGD momentum needs a buffer")
            }
            None => param.inplace_op3(grad, grad, &SgdOp { c, buffer: false }),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use candle_core::Device;

        fn data(n: usize, seed: u64) -> Vec<f64> {
            let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
                })
                .collect()
        }

        /// Three AdamW steps equal `torch.optim.AdamW`'s single-tensor algorithm written out on
        /// scalars (f64, so any difference is a formula difference, not rounding).
        #[test]
        fn adamw_matches_the_pytorch_algorithm() {
            let dev = Device::Cpu;
            let n = 37;
            let p0 = data(n, 1);
            let p = Tensor::from_vec(p0.clone(), n, &dev).unwrap();
            let m = p.zeros_like().unwrap();
            let v = p.zeros_like().unwrap();
            let (lr, wd, b1, b2, eps, scale) = (1e-2, 0.05, 0.8, 0.95, 1e-6, 0.5);
            let mut rp = p0.clone();
            let (mut rm, mut rv) = (vec![0.0; n], vec![0.0; n]);
            for t in 1..=3 {
                let g0 = data(n, 10 + t as u64);
                let g = Tensor::from_vec(g0.clone(), n, &dev).unwrap();
                let c = AdamW {
                    lr,
                    weight_decay: wd,
                    beta1: b1,
                    beta2: b2,
                    eps,
                    step: t,
                    grad_scale: scale,
                };
                adamw(&p, &m, &v, &g, c).unwrap();
                // torch/optim/adamw.py (_single_tensor_adam with decoupled weight decay).
                for k in 0..n {
                    let g = g0[k] * scale;
                    rp[k] *= 1.0 - lr * wd;
                    rm[k] += (1.0 - b1) * (g - rm[k]);
                    rv[k] = rv[k] * b2 + (1.0 - b2) * g * g;
                    let bc1 = 1.0 - b1.powi(t);
                    let bc2 = 1.0 - b2.powi(t);
                    let denom = rv[k].sqrt() / bc2.sqrt() + eps;
                    rp[k] -= lr / bc1 * rm[k] / denom;
                }
            }
            for (got, want) in [(&p, &rp), (&m, &rm), (&v, &rv)] {
                let got = got.to_vec1::<f64>().unwrap();
                for (a, b) in got.iter().zip(want.iter()) {
                    assert!((a - b).abs() <= 1e-14, "{a} vs {b}");
                }
            }
            // The update moved the parameters (the test would otherwise pass vacuously).
            assert!(rp.iter().zip(&p0).any(|(a, b)| (a - b).abs() > 1e-3));
        }

        /// SGD with and without momentum, Nesterov and weight decay equals `torch.optim.SGD`'s
        /// algorithm written out on scalars (f64).
        #[test]
        fn sgd_matches_the_pytorch_algorithm() {
            let dev = Device::Cpu;
            let n = 29;
            for (momentum, nesterov, wd) in [
                (0.0, false, 0.0),
                (0.9, false, 1e-4),
                (0.9, true, 1e-2),
                (0.0, false, 0.1),
            ] {
                let p0 = data(n, 2);
                let p = Tensor::from_vec(p0.clone(), n, &dev).unwrap();
                let buf = (momentum != 0.0).then(|| p.zeros_like().unwrap());
                let lr = 0.1;
                let mut rp = p0.clone();
                let mut rb: Option<Vec<f64>> = None;
                for t in 1..=3u64 {
                    let g0 = data(n, 20 + t);
                    let g = Tensor::from_vec(g0.clone(), n, &dev).unwrap();
                    let c = Sgd {
                        lr,
                        weight_decay: wd,
                        momentum,
                        nesterov,
                        grad_scale: 1.0,
                    };
                    sgd(&p, buf.as_ref(), &g, c).unwrap();
                    // torch/optim/sgd.py (_single_tensor_sgd, dampening 0).
                    let d: Vec<f64> = (0..n).map(|k| g0[k] + wd * rp[k]).collect();
                    let step: Vec<f64> = if momentum != 0.0 {
                        let b = match rb.take() {
                            None => d.clone(),
                            Some(b) => (0..n).map(|k| b[k] * momentum + d[k]).collect(),
                        };
                        let s = if nesterov {
                            (0..n).map(|k| d[k] + momentum * b[k]).collect()
                        } else {
                            b.clone()
                        };
                        rb = Some(b);
                        s
                    } else {
                        d
                    };
                    for k in 0..n {
                        rp[k] -= lr * step[k];
                    }
                }
                let got = p.to_vec1::<f64>().unwrap();
                for (a, b) in got.iter().zip(&rp) {
                    assert!(
                        (a - b).abs() <= 1e-14,
                        "momentum {momentum} nesterov {nesterov}: {a} vs {b}"
                    );
                }
                assert!(rp.iter().zip(&p0).any(|(a, b)| (a - b).abs() > 1e-3));
            }
        }
    }
}
