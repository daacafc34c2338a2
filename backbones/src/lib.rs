//! densepred-backbones: SMT, Conv2Former and MCGA, each with its variant presets and the
//! checkpoint key mapping.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use densepred_core::ShapeSpec;

pub mod conv2former;
pub mod mcga;
pub mod smt;

/// A backbone: image batch in, multi-scale feature maps out.
pub trait Backbone {
    /// `x` `(B, 3, H, W)` normalised image batch → one `(B, C_i, H_i, W_i)` map per output index,
    /// finest first. `train` selects training behaviour (batch-norm statistics, stochastic depth).
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>>;

    /// Channels and stride of each map that [`Backbone::forward`] returns, in the same order.
    fn out_shapes(&self) -> Vec<ShapeSpec>;
}

densepred_core::config_by_type! {
    /// The `[backbone]` / `[model.backbone]` config table, selected by its `type` key.
    pub enum BackboneConfig {
        /// Scale-Aware Modulation Transformer.
        "SMT" => Smt(smt::SmtConfig),
        /// Conv2Former (convolutional modulation).
        "Conv2Former" => Conv2Former(conv2former::Conv2FormerConfig),
        /// MCGA (multi-scale convolutions meet group attention).
        "MCGA" => Mcga(mcga::McgaConfig),
    }
}

/// A built backbone of any supported type.
pub enum AnyBackbone {
    /// SMT.
    Smt(smt::Smt),
    /// Conv2Former.
    Conv2Former(conv2former::Conv2Former),
    /// MCGA.
    Mcga(mcga::Mcga),
}

impl AnyBackbone {
    /// Builds the backbone that `cfg` describes, with parameters created in (or fetched from) `vb`.
    ///
    /// Errors: inconsistent hyper-parameters (the message names the field).
    pub fn new(vb: VarBuilder, cfg: &BackboneConfig) -> Result<Self> {
        match cfg {
            BackboneConfig::Smt(c) => Ok(Self::Smt(smt::Smt::new(vb, c)?)),
            BackboneConfig::Conv2Former(c) => {
                Ok(Self::Conv2Former(conv2former::Conv2Former::new(vb, c)?))
            }
            BackboneConfig::Mcga(c) => Ok(Self::Mcga(mcga::Mcga::new(vb, c)?)),
        }
    }

    /// Maps an official checkpoint key of this backbone type to our parameter name.
    pub fn map_checkpoint_key(&self, key: &str) -> String {
        match self {
            Self::Smt(_) => smt::map_checkpoint_key(key),
            Self::Conv2Former(_) => conv2former::map_checkpoint_key(key),
            Self::Mcga(_) => mcga::map_checkpoint_key(key),
        }
    }

    /// The classification logits `(B, num_classes)` from the last stage map, if the backbone has a
    /// head (`None` otherwise).
    pub fn classify(&self, last: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Smt(m) if m.has_head() => m.classify(last).map(Some),
            Self::Conv2Former(m) if m.has_head() => m.classify(last).map(Some),
            Self::Mcga(m) if m.has_head() => m.classify(last).map(Some),
            Self::Smt(_) | Self::Conv2Former(_) | Self::Mcga(_) => Ok(None),
        }
    }

    /// Runs every stage (ignoring `out_indices`): the four maps `(B, C_i, H/s_i, W/s_i)`.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        match self {
            Self::Smt(m) => Ok(m.forward_all(x, train, false)?.0),
            Self::Conv2Former(m) => m.forward_stages(x, train),
            Self::Mcga(m) => m.forward_stages(x, train),
        }
    }
}

impl Backbone for AnyBackbone {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        match self {
            Self::Smt(m) => m.forward(x, train),
            Self::Conv2Former(m) => m.forward(x, train),
            Self::Mcga(m) => m.forward(x, train),
        }
    }

    fn out_shapes(&self) -> Vec<ShapeSpec> {
        match self {
            Self::Smt(m) => m.out_shapes(),
            Self::Conv2Former(m) => m.out_shapes(),
            Self::Mcga(m) => m.out_shapes(),
        }
    }
}
