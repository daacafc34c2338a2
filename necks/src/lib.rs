//! densepred-necks: feature-pyramid necks between backbones and heads.

pub mod fpn;

use candle_core::{Result, Tensor};

/// A neck: backbone maps in, pyramid maps out.
pub trait Neck: Send + Sync {
    /// `(B, C_i, H_i, W_i)` per backbone output, finest first → `(B, C, H_l, W_l)` per level.
    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>>;
}

impl Neck for fpn::Fpn {
    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        fpn::Fpn::forward(self, inputs)
    }
}
