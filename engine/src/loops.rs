//! The loops (mmengine's `runner/loops.py`): the train loop owns the order of work and nothing
//! else; validation runs inside it when due; side effects are [`crate::hooks`].

use crate::hooks::{Hook, LoopState, Runtime};
use crate::optim::Optimizer;
use crate::runner::*;
use crate::tester::validate;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use densepred_datasets::loader::{Batch, DataLoader};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Seed of iteration `b` of a run seeded `a` (SplitMix64 over the pair).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// mmengine's `EpochBasedTrainLoop` / `IterBasedTrainLoop`: the order of work only. For each
/// batch: hooks before the iteration, the train step (losses, backward, gradient accumulation,
/// clipping, optimizer step), hooks after it, then validation (mmengine's `ValLoop`) when due;
/// epochs follow one another until `max_iters`. Side effects live in the hooks.
pub struct TrainLoop<'a> {
    pub loader: &'a DataLoader,
    /// Validation data, metric and the loop settings (`val_interval`, `val_begin`).
    pub val: Option<(&'a Loader, &'a EvaluatorConfig, &'a TrainLoopConfig)>,
    /// `optim_wrapper.accumulative_counts` (≥ 1).
    pub accumulate: u64,
    /// `optim_wrapper.clip_grad.max_norm`.
    pub clip_grad: Option<f64>,
    pub seed: u64,
    pub device: &'a Device,
    pub interrupt: Option<&'a AtomicBool>,
    /// The data-parallel run (gradients are averaged across its ranks before each step).
    pub dist: &'a crate::dist::Dist,
}

impl TrainLoop<'_> {
    /// Runs the loop from `st.iter` to `st.max_iters`.
    ///
    /// Errors: data, model, hook and validation errors; [`EngineError::Interrupted`] when the
    /// interrupt flag was raised (after the iteration in flight).
    pub fn run(
        &self,
        model: &BuiltModel,
        opt: &mut Optimizer,
        table: &toml::Table,
        work_dir: &Path,
        hooks: &mut [Box<dyn Hook>],
        st: &mut LoopState,
    ) -> Result<(), EngineError> {
        {
            let rt = Runtime {
                model,
                optimizer: opt,
                work_dir,
                table,
            };
            for h in hooks.iter_mut() {
                h.before_train(&rt, st)?;
            }
        }
        let mut grads: Option<GradStore> = None;
        while st.iter < st.max_iters {
            let epoch = st.iter / st.epoch_len;
            let epoch_start = st.iter;
            let mut batches = self
                .loader
                .epoch_from(epoch, (st.iter % st.epoch_len) as usize);
            loop {
                if st.iter >= st.max_iters {
                    break;
                }
                for h in hooks.iter_mut() {
                    h.before_fetch(st);
                }
                let Some(batch) = batches.next() else {
                    break;
                };
                for h in hooks.iter_mut() {
                    h.before_train_iter(st);
                }
                let batch = to_batch(model, batch?, self.device, true)?;
                self.train_step(model, opt, &batch, &mut grads, st)?;
                st.iter += 1;
                let rt = Runtime {
                    model,
                    optimizer: opt,
                    work_dir,
                    table,
                };
                for h in hooks.iter_mut() {
                    h.after_train_iter(&rt, st)?;
                }
                if self.val_due(st) {
                    let (l, ev, _) = self.val.expect("val_due checks it");
                    st.progress
                        .suspend(|| tracing::info!("evaluating on {} images", l.dataset.len()));
                    let out = validate(
                        model,
                        &l.loader,
                        l.dataset.as_ref(),
                        ev,
                        self.device,
                        self.dist,
                    )?;
                    let out = out.map(|(lines, mut rec)| {
                        rec.insert("mode".into(), "val".into());
                        rec.insert("iter".into(), st.iter.into());
                        rec.insert("epoch".into(), st.iter.div_ceil(st.epoch_len).into());
                        (lines, rec)
                    });
                    if let Some((_, rec)) = &out {
                        st.last_val = Some(rec.clone());
                    }
                    for h in hooks.iter_mut() {
                        h.after_val(&rt, st, out.as_ref())?;
                    }
                }
                if self.interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) {
                    st.progress.abandon();
                    return Err(EngineError::Interrupted);
                }
            }
            if st.iter == epoch_start && st.iter < st.max_iters {
                // Defensive: the loader reports every failure as an error, so an epoch that
                // ends without a batch would otherwise restart forever.
                return Err(EngineError::Data(densepred_datasets::DataError::Loader(
                    format!("epoch {} yielded no batch", epoch + 1),
                )));
            }
        }
        st.progress.finish_and_clear();
        let rt = Runtime {
            model,
            optimizer: opt,
            work_dir,
            table,
        };
        for h in hooks.iter_mut() {
            h.after_train(&rt, st)?;
        }
        Ok(())
    }

    /// mmengine's `train_step`: losses (each checked finite, as `CheckInvalidLossHook`, before
    /// the backward pass), backward, gradient accumulation over `accumulative_counts`
    /// iterations, clipping by the global norm, optimizer step. Fills `st.losses` and
    /// `st.grad_norm`.
    fn train_step(
        &self,
        model: &BuiltModel,
        opt: &mut Optimizer,
        batch: &Batch,
        grads: &mut Option<GradStore>,
        st: &mut LoopState,
    ) -> Result<(), EngineError> {
        let it = st.iter;
        densepred_core::rng::seed(mix(self.seed, it));
        let losses = model.loss(batch).map_err(|e| match e {
            EngineError::Candle { context, source } => EngineError::Candle {
                context: format!("iteration {}: {context}", it + 1),
                source,
            },
            o => o,
        })?;
        st.losses.clear();
        let mut total: Option<Tensor> = None;
        for (name, v) in &losses {
            let f = v.to_scalar::<f32>().ctx("loss value")? as f64;
            if !f.is_finite() {
                return Err(EngineError::Config(format!(
                    "iteration {}: {name} is {f} (diverged); lower the learning rate",
                    it + 1
                )));
            }
            st.losses.push((name.clone(), f));
            total = Some(match total {
                None => v.clone(),
                Some(t) => (t + v).ctx("loss sum")?,
            });
        }
        let total =
            total.ok_or_else(|| EngineError::Config("the model returned no loss".into()))?;
        st.losses.push((
            "loss".into(),
            total.to_scalar::<f32>().ctx("loss value")? as f64,
        ));
        let scaled = if self.accumulate > 1 {
            (total / self.accumulate as f64).ctx("loss scale")?
        } else {
            total
        };
        let g = scaled
            .backward()
            .ctx(&format!("iteration {}: backward", it + 1))?;
        *grads = Some(match grads.take() {
            None => g,
            Some(mut acc) => {
                for p in &opt.params {
                    if let Some(new) = g.get(p.var.as_tensor()) {
                        let sum = match acc.get(p.var.as_tensor()) {
                            Some(old) => (old + new).ctx("gradient accumulation")?,
                            None => new.clone(),
                        };
                        acc.insert(p.var.as_tensor(), sum);
                    }
                }
                acc
            }
        });
        st.grad_norm = None;
        if (it + 1) % self.accumulate == 0 || it + 1 == st.max_iters {
            let mut gs = grads.take().expect("set above");
            let params: Vec<&Tensor> = opt.params.iter().map(|p| p.var.as_tensor()).collect();
            self.dist.average_gradients(&params, &mut gs)?;
            let mut scale = 1.0;
            if let Some(max_norm) = self.clip_grad {
                let n = opt.grad_norm(&gs).ctx("gradient norm")?;
                st.grad_norm = Some(n);
                if n > max_norm {
                    scale = max_norm / (n + 1e-6);
                }
            }
            opt.step(&gs, st.lr, scale).ctx("optimizer step")?;
        }
        Ok(())
    }

    /// Validation after the iteration just done: every `val_interval` epochs (epoch-based) or
    /// iterations from `val_begin` on, and after the last iteration.
    fn val_due(&self, st: &LoopState) -> bool {
        let Some((_, _, c)) = self.val else {
            return false;
        };
        if st.iter == st.max_iters {
            return true;
        }
        if st.by_epoch {
            let e = st.iter / st.epoch_len;
            st.epoch_end() && e % c.val_interval == 0 && e >= c.val_begin
        } else {
            st.iter % c.val_interval == 0 && st.iter >= c.val_begin
        }
    }
}
