//! Learning-rate schedules with mmengine's `param_scheduler` semantics, evaluated in closed form
//! per iteration: every scheduler is active on `[begin, end)` (epochs when `by_epoch`, converted
//! to iterations with the epoch length) and multiplies the base learning rate by its factor;
//! after `end` it keeps its last factor. Chained schedulers multiply.

use densepred_core::config::defaults as d;
use serde::{Deserialize, Serialize};

fn third() -> f64 {
    1.0 / 3.0
}
fn tenth() -> f64 {
    0.1
}
fn inf() -> f64 {
    f64::INFINITY
}

/// One `param_scheduler` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum SchedulerConfig {
    /// Linear factor from `start_factor` to `end_factor` over `[begin, end)` (warm-up).
    #[serde(rename = "LinearLR")]
    Linear {
        /// Factor at `begin`.
        #[serde(default = "third")]
        start_factor: f64,
        /// Factor from `end − 1` on.
        #[serde(default = "d::one_f64")]
        end_factor: f64,
        /// First step.
        #[serde(default)]
        begin: f64,
        /// Step after the last.
        #[serde(default = "inf")]
        end: f64,
        /// Count in epochs.
        #[serde(default = "d::yes")]
        by_epoch: bool,
        /// With `by_epoch`: update every iteration over the same span (mmengine's
        /// `build_iter_from_epoch`) instead of at epoch boundaries.
        #[serde(default)]
        convert_to_iter_based: bool,
    },
    /// Multiply by `gamma` at each milestone (relative to `begin`).
    #[serde(rename = "MultiStepLR")]
    MultiStep {
        /// Steps where the factor drops.
        milestones: Vec<f64>,
        /// Drop factor.
        #[serde(default = "tenth")]
        gamma: f64,
        /// First step.
        #[serde(default)]
        begin: f64,
        /// Step after the last.
        #[serde(default = "inf")]
        end: f64,
        /// Count in epochs.
        #[serde(default = "d::yes")]
        by_epoch: bool,
        /// With `by_epoch`: update every iteration over the same span (mmengine's
        /// `build_iter_from_epoch`) instead of at epoch boundaries.
        #[serde(default)]
        convert_to_iter_based: bool,
    },
    /// Half-cosine from the base value to `eta_min` over `T_max` steps.
    #[serde(rename = "CosineAnnealingLR")]
    Cosine {
        /// Period (default `end − begin`).
        #[serde(rename = "T_max", default)]
        t_max: Option<f64>,
        /// Final learning rate.
        #[serde(default)]
        eta_min: f64,
        /// First step.
        #[serde(default)]
        begin: f64,
        /// Step after the last.
        #[serde(default = "inf")]
        end: f64,
        /// Count in epochs.
        #[serde(default = "d::yes")]
        by_epoch: bool,
        /// With `by_epoch`: update every iteration over the same span (mmengine's
        /// `build_iter_from_epoch`) instead of at epoch boundaries.
        #[serde(default)]
        convert_to_iter_based: bool,
    },
    /// `(base − eta_min)·(1 − s / (end − begin − 1))^power + eta_min`.
    #[serde(rename = "PolyLR")]
    Poly {
        /// Final learning rate.
        #[serde(default)]
        eta_min: f64,
        /// Exponent.
        #[serde(default = "d::one_f64")]
        power: f64,
        /// First step.
        #[serde(default)]
        begin: f64,
        /// Step after the last.
        #[serde(default = "inf")]
        end: f64,
        /// Count in epochs.
        #[serde(default = "d::yes")]
        by_epoch: bool,
        /// With `by_epoch`: update every iteration over the same span (mmengine's
        /// `build_iter_from_epoch`) instead of at epoch boundaries.
        #[serde(default)]
        convert_to_iter_based: bool,
    },
}

/// Learning rate of iteration `iter` (0-based) for base rate `base_lr`, given the epoch length in
/// iterations (`epoch_len`, ≥ 1) and the training length `max_iters` (bounds open-ended
/// schedulers).
pub fn lr_at(
    schedulers: &[SchedulerConfig],
    base_lr: f64,
    iter: u64,
    epoch_len: u64,
    max_iters: u64,
) -> f64 {
    let mut lr = base_lr;
    let it = iter as f64;
    let el = epoch_len.max(1) as f64;
    for s in schedulers {
        let (begin, end, by_epoch, convert) = match s {
            SchedulerConfig::Linear {
                begin,
                end,
                by_epoch,
                convert_to_iter_based,
                ..
            }
            | SchedulerConfig::MultiStep {
                begin,
                end,
                by_epoch,
                convert_to_iter_based,
                ..
            }
            | SchedulerConfig::Cosine {
                begin,
                end,
                by_epoch,
                convert_to_iter_based,
                ..
            }
            | SchedulerConfig::Poly {
                begin,
                end,
                by_epoch,
                convert_to_iter_based,
                ..
            } => (*begin, *end, *by_epoch, *convert_to_iter_based),
        };
        let k = if by_epoch { el } else { 1.0 };
        let (b, e) = (
            (begin * k).floor(),
            if end.is_finite() {
                (end * k).floor()
            } else {
                max_iters as f64
            },
        );
        if it < b {
            continue;
        }
        // Epoch-based schedulers step at epoch boundaries unless converted to iterations, where
        // epoch-valued settings (milestones, `T_max`) are multiplied by the epoch length.
        let per_epoch = by_epoch && !convert;
        let unit = if by_epoch && convert { el } else { 1.0 };
        let raw = if per_epoch {
            ((it - b) / el).floor()
        } else {
            it - b
        };
        let span = if per_epoch { (e - b) / el } else { e - b };
        let step = raw.min((span - 1.0).max(0.0));
        let f = match s {
            SchedulerConfig::Linear {
                start_factor,
                end_factor,
                ..
            } => {
                let total = (span - 1.0).max(1.0);
                start_factor + (end_factor - start_factor) * step.min(total) / total
            }
            SchedulerConfig::MultiStep {
                milestones, gamma, ..
            } => {
                let n = milestones.iter().filter(|&&m| m * unit <= step).count();
                gamma.powi(n as i32)
            }
            SchedulerConfig::Cosine { t_max, eta_min, .. } => {
                let tm = t_max.map(|t| t * unit).unwrap_or(span).max(1.0);
                let base = lr;
                let v = eta_min
                    + (base - eta_min) * (1.0 + (std::f64::consts::PI * step / tm).cos()) / 2.0;
                if base == 0.0 {
                    1.0
                } else {
                    v / base
                }
            }
            SchedulerConfig::Poly { eta_min, power, .. } => {
                let total = (span - 1.0).max(1.0);
                let base = lr;
                let v = (base - eta_min) * (1.0 - step.min(total) / total).powf(*power) + eta_min;
                if base == 0.0 {
                    1.0
                } else {
                    v / base
                }
            }
        };
        lr *= f;
    }
    lr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Vec<SchedulerConfig> {
        #[derive(Deserialize)]
        struct W {
            param_scheduler: Vec<SchedulerConfig>,
        }
        toml::from_str::<W>(s).unwrap().param_scheduler
    }

    #[test]
    fn warmup_then_multistep_as_mmdet_1x() {
        // mmdet schedule_1x: LinearLR(0.001, by_epoch=False, 0..500) + MultiStepLR([8, 11]).
        let s = cfg(r#"
[[param_scheduler]]
type = "LinearLR"
start_factor = 0.001
by_epoch = false
begin = 0
end = 500
[[param_scheduler]]
type = "MultiStepLR"
begin = 0
end = 12
by_epoch = true
milestones = [8, 11]
gamma = 0.1
"#);
        let lr = |i| lr_at(&s, 0.01, i, 1000, 12000);
        assert!((lr(0) - 1e-5).abs() < 1e-12);
        // Linear over 499 steps: factor at step 250 = 0.001 + 0.999 * 250 / 499.
        assert!((lr(250) - 0.01 * (0.001 + 0.999 * 250.0 / 499.0)).abs() < 1e-12);
        assert!((lr(499) - 0.01).abs() < 1e-12);
        assert!((lr(7999) - 0.01).abs() < 1e-12);
        assert!((lr(8000) - 0.001).abs() < 1e-12);
        assert!((lr(11000) - 0.0001).abs() < 1e-12);
    }

    #[test]
    fn poly_reaches_eta_min_at_the_end() {
        let s = cfg(r#"
[[param_scheduler]]
type = "PolyLR"
eta_min = 0.0
power = 1.0
begin = 0
end = 101
by_epoch = false
"#);
        assert!((lr_at(&s, 1.0, 0, 1, 101) - 1.0).abs() < 1e-12);
        assert!((lr_at(&s, 1.0, 50, 1, 101) - 0.5).abs() < 1e-12);
        assert!(lr_at(&s, 1.0, 100, 1, 101).abs() < 1e-12);
    }

    #[test]
    fn convert_to_iter_based_updates_every_iteration() {
        // Cosine over 2 epochs of 10 iterations: per epoch without conversion, per iteration
        // (T_max = 20 iterations) with it, as mmengine's build_iter_from_epoch.
        let text = |convert: bool| {
            format!(
                "[[param_scheduler]]\ntype = \"CosineAnnealingLR\"\nT_max = 2\nbegin = 0\n\
                 end = 2\nby_epoch = true\nconvert_to_iter_based = {convert}\n"
            )
        };
        let stepped = cfg(&text(false));
        let smooth = cfg(&text(true));
        assert!((lr_at(&stepped, 1.0, 5, 10, 20) - 1.0).abs() < 1e-12);
        assert!((lr_at(&stepped, 1.0, 10, 10, 20) - 0.5).abs() < 1e-12);
        let want = (1.0 + (std::f64::consts::PI * 5.0 / 20.0).cos()) / 2.0;
        assert!((lr_at(&smooth, 1.0, 5, 10, 20) - want).abs() < 1e-12);
        // MultiStep milestones in epochs become iterations.
        let ms = |convert: bool| {
            cfg(&format!(
                "[[param_scheduler]]\ntype = \"MultiStepLR\"\nmilestones = [1]\nby_epoch = true\n\
                 convert_to_iter_based = {convert}\n"
            ))
        };
        for convert in [false, true] {
            assert!((lr_at(&ms(convert), 1.0, 9, 10, 20) - 1.0).abs() < 1e-12);
            assert!((lr_at(&ms(convert), 1.0, 10, 10, 20) - 0.1).abs() < 1e-12);
        }
    }
}
