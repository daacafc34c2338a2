//! Optimizers with mmengine's `optim_wrapper` semantics: AdamW and SGD (PyTorch's update rules),
//! parameter-wise multipliers (`paramwise_cfg`), gradient clipping by global norm and gradient
//! accumulation.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use densepred_core::params::is_buffer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn eps8() -> f64 {
    1e-8
}
fn wd_adamw() -> f64 {
    0.01
}
fn two() -> f64 {
    2.0
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
    #[serde(default = "one")]
    pub lr_mult: f64,
    /// Weight-decay multiplier.
    #[serde(default = "one")]
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
    /// Accepted for compatibility.
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
    #[serde(default = "two")]
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
    #[serde(default = "one_usize")]
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
            let g = g.detach();
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g
            };
            let lr_p = lr * p.lr_mult;
            let wd_p = wd * p.decay_mult;
            let w = &p.var.as_tensor().detach();
            match &self.cfg {
                OptimizerConfig::AdamW { betas, eps, .. } => {
                    let (b1, b2) = (betas[0], betas[1]);
                    let (m, v) = match self.state[i].take() {
                        Some((m, v)) => (
                            ((m * b1)? + (&g * (1.0 - b1))?)?,
                            ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                        ),
                        None => ((&g * (1.0 - b1))?, (g.sqr()? * (1.0 - b2))?),
                    };
                    let bc1 = 1.0 - b1.powi(t);
                    let bc2 = 1.0 - b2.powi(t);
                    let decayed = if wd_p != 0.0 {
                        (w * (1.0 - lr_p * wd_p))?
                    } else {
                        w.clone()
                    };
                    let denom = ((v.sqrt()? / bc2.sqrt())? + *eps)?;
                    let upd = ((&m / denom)? * (lr_p / bc1))?;
                    p.var.set(&(decayed - upd)?)?;
                    self.state[i] = Some((m, v));
                }
                OptimizerConfig::Sgd {
                    momentum, nesterov, ..
                } => {
                    let mut d = if wd_p != 0.0 { (&g + (w * wd_p)?)? } else { g };
                    if *momentum != 0.0 {
                        let buf = match self.state[i].take() {
                            Some((b, _)) => ((b * *momentum)? + &d)?,
                            None => d.clone(),
                        };
                        d = if *nesterov {
                            (&d + (&buf * *momentum)?)?
                        } else {
                            buf.clone()
                        };
                        let z = Tensor::zeros(0, DType::F32, buf.device())?;
                        self.state[i] = Some((buf, z));
                    }
                    p.var.set(&(w - (d * lr_p)?)?)?;
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
