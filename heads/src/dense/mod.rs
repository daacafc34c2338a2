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

/// The training path of anchor-based heads (mmdetection's `AnchorHead`, which RetinaHead and
/// ATSSHead share): the anchors of the outputs' levels, per-image targets from the configured
/// assigner (pseudo sampling), then the head's own [`AnchorHead::loss_from_targets`].
pub trait AnchorHead {
    /// The head's anchor generator (`anchor_generator` of its config).
    fn anchor_generator(&self) -> &crate::task::prior_generator::AnchorGenerator;
    /// Object classes (no background).
    fn num_classes(&self) -> usize;
    /// Named per-level losses from precomputed targets (each head's formulas).
    fn loss_from_targets(
        &self,
        outs: &DenseOutputs,
        anchors: &common::Anchors,
        targets: &[common::ImageTargets],
    ) -> Result<LevelLosses>;

    /// The anchors of a batch whose outputs are `outs` (one set per level, `(H_l·W_l·A, 4)`
    /// xyxy pixels).
    ///
    /// Errors: candle errors.
    fn anchors(&self, outs: &DenseOutputs) -> Result<common::Anchors> {
        common::Anchors::new(
            self.anchor_generator(),
            &outs.cls_scores,
            outs.cls_scores[0].device(),
        )
    }

    /// Per-image targets (the assigner of `train_cfg`: MaxIoU or ATSS; pseudo sampling).
    ///
    /// Errors: candle errors; metas / GT of another batch size.
    fn get_targets(
        &self,
        anchors: &common::Anchors,
        metas: &[ImageMeta],
        gts: &[GtInstances],
        train_cfg: &DenseTrainConfig,
    ) -> Result<Vec<common::ImageTargets>> {
        common::batch_anchor_targets(
            anchors,
            self.anchor_generator(),
            metas,
            gts,
            train_cfg,
            self.num_classes(),
        )
    }

    /// mmdetection's `loss_by_feat`: anchors, targets, losses.
    ///
    /// Errors: as the three steps.
    fn loss_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        gts: &[GtInstances],
        train_cfg: &DenseTrainConfig,
    ) -> Result<LevelLosses> {
        let anchors = self.anchors(outs)?;
        let targets = self.get_targets(&anchors, metas, gts, train_cfg)?;
        self.loss_from_targets(outs, &anchors, &targets)
    }
}

macro_rules! impl_dense_head {
    ($t:ty) => {
        impl AnchorHead for $t {
            fn anchor_generator(&self) -> &crate::task::prior_generator::AnchorGenerator {
                self.cfg.anchor_generator.generator()
            }
            fn num_classes(&self) -> usize {
                self.cfg.num_classes
            }
            fn loss_from_targets(
                &self,
                outs: &DenseOutputs,
                anchors: &common::Anchors,
                targets: &[common::ImageTargets],
            ) -> Result<LevelLosses> {
                <$t>::loss_from_targets(self, outs, anchors, targets)
            }
        }

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
                <$t as AnchorHead>::loss_by_feat(self, outs, metas, gts, train_cfg)
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
