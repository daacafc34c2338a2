//! Parameter storage: a candle-nn `VarMap` behind a `VarBuilder`, with initialisers drawn from a
//! seeded generator so that a model built twice with the same seed has the same weights (candle's
//! own `Init::var` uses an unseeded thread RNG).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::sync::{Arc, Mutex};

/// A `VarMap` whose missing variables are created from a seeded `StdRng`.
///
/// Cloning shares the same variables and generator.
#[derive(Clone)]
pub struct SeededVarMap {
    map: VarMap,
    rng: Arc<Mutex<StdRng>>,
}

impl SeededVarMap {
    /// An empty map whose initialisers draw from `StdRng::seed_from_u64(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            map: VarMap::new(),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// The underlying candle-nn `VarMap` (all parameters and buffers, by dotted name).
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// A `VarBuilder` that creates missing variables in this map (dtype `dtype`, on `device`).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// All `(name, variable)` pairs sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.map.data().lock().expect("var map lock poisoned");
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of trainable scalars (every variable except BatchNorm buffers), as PyTorch's
    /// `sum(p.numel() for p in model.parameters())`.
    pub fn num_parameters(&self) -> usize {
        self.named_vars()
            .iter()
            .filter(|(k, _)| !is_buffer(k))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// A `VarBuilder` over detached copies of the current values (sharing storage, not tracked by
    /// autograd): a model built from it runs inference without recording a backward graph, so
    /// intermediates are freed as soon as they are used.
    pub fn inference_var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let map: std::collections::HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        VarBuilder::from_tensors(map, dtype, device)
    }

    fn sample(&self, shape: &Shape, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().expect("rng lock poisoned");
        let values: Vec<f64> = match init {
            Init::Const(v) => vec![v; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| mean + stdev * Distribution::<f64>::sample(&StandardNormal, &mut *rng))
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up)).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = fan.for_shape(shape) as f64;
                let std = non_linearity.gain() / fan.max(1.0).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Normal => (0..n)
                        .map(|_| std * Distribution::<f64>::sample(&StandardNormal, &mut *rng))
                        .collect(),
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        (0..n).map(|_| rng.random_range(-b..b)).collect()
                    }
                }
            }
        };
        Tensor::from_vec(values, shape.clone(), dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(v) = self
            .map
            .data()
            .lock()
            .expect("var map lock poisoned")
            .get(name)
        {
            if v.shape() != &s {
                candle_core::bail!(
                    "parameter {name}: shape {:?} requested, {:?} stored",
                    s,
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let t = self.sample(&s, h, dtype, dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.map
            .data()
            .lock()
            .expect("var map lock poisoned")
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self
            .map
            .data()
            .lock()
            .expect("var map lock poisoned")
            .get(name)
        {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("parameter {name} does not exist"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .expect("var map lock poisoned")
            .contains_key(name)
    }
}

/// True for names of non-trainable buffers (BatchNorm running statistics), which optimizers skip.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}
