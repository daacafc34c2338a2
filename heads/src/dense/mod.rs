//! Dense detection heads: RetinaHead and ATSSHead (one-stage) and RPNHead (the first stage of
//! two-stage detectors), with mmdetection 3.x semantics.

pub mod atss_head;
pub mod common;
pub mod retina_head;
pub mod rpn_head;

pub use atss_head::{AtssHead, AtssHeadConfig};
pub use common::{DenseTestConfig, DenseTrainConfig};
pub use retina_head::{DenseOutputs, LevelLosses, RetinaHead, RetinaHeadConfig};
pub use rpn_head::{
    Proposals, RpnHead, RpnHeadConfig, RpnHeadType, RpnProposalConfig, RpnTrainConfig,
};

use candle_core::{Result, Tensor};
use densepred_core::structures::{Detections, GtInstances, ImageMeta};

/// A dense (one-stage) detection head.
pub trait DenseHead: Send + Sync {
    /// FPN levels `(B, C, H_l, W_l)` → raw outputs per level.
    fn forward(&self, feats: &[Tensor]) -> Result<DenseOutputs>;
    /// Named losses, one value per level (mmdetection's `loss_by_feat`).
    fn loss_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        gts: &[GtInstances],
        train_cfg: &DenseTrainConfig,
    ) -> Result<LevelLosses>;
    /// Detections per image in original-image pixels (`rescale=True`).
    fn predict_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        test_cfg: &DenseTestConfig,
    ) -> Result<Vec<Detections>>;
}

macro_rules! impl_dense_head {
    ($t:ty) => {
        impl DenseHead for $t {
            fn forward(&self, feats: &[Tensor]) -> Result<DenseOutputs> {
                <$t>::forward(self, feats)
            }
            fn loss_by_feat(
                &self,
                outs: &DenseOutputs,
                metas: &[ImageMeta],
                gts: &[GtInstances],
                train_cfg: &DenseTrainConfig,
            ) -> Result<LevelLosses> {
                <$t>::loss_by_feat(self, outs, metas, gts, train_cfg)
            }
            fn predict_by_feat(
                &self,
                outs: &DenseOutputs,
                metas: &[ImageMeta],
                test_cfg: &DenseTestConfig,
            ) -> Result<Vec<Detections>> {
                <$t>::predict_by_feat(self, outs, metas, test_cfg)
            }
        }
    };
}
impl_dense_head!(RetinaHead);
impl_dense_head!(AtssHead);
