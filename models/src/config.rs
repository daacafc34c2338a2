//! The model-level configs: the `[model]` table (a detector or a segmentor, selected by `type`)
//! and the neck table both kinds share.

use crate::detector::{DataPreprocessorConfig, DetectorConfig, TwoStageDetectorConfig};
use crate::segmentor::EncoderDecoderConfig;
use candle_nn::VarBuilder;
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_necks::fpn::{Fpn, FpnConfig};
use densepred_necks::Neck;

densepred_core::config_by_type! {
    /// `model.neck` table.
    pub enum NeckConfig {
        /// Feature pyramid network.
        "FPN" => Fpn(FpnConfig),
    }
}

impl NeckConfig {
    /// Builds the neck under `vb` on the outputs of `backbone`.
    ///
    /// Errors: `in_channels` that differ from the backbone's output channels; neck errors.
    pub fn build(
        &self,
        vb: VarBuilder,
        backbone: &AnyBackbone,
    ) -> candle_core::Result<Box<dyn Neck>> {
        match self {
            Self::Fpn(f) => {
                let got: Vec<usize> = backbone.out_shapes().iter().map(|s| s.channels).collect();
                if got != f.in_channels {
                    candle_core::bail!(
                        "model.neck.in_channels {:?} do not match the backbone's output channels {:?}",
                        f.in_channels,
                        got
                    );
                }
                Ok(Box::new(Fpn::new(vb, f)?))
            }
        }
    }
}

densepred_core::config_by_type! {
    /// The `[model]` table, selected by `type`: a detector (mmdetection) or a segmentor
    /// (mmsegmentation).
    pub enum ModelConfig {
        /// RetinaNet (Lin et al. 2017).
        "RetinaNet" => RetinaNet(DetectorConfig),
        /// ATSS (Zhang et al. 2020).
        "ATSS" => Atss(DetectorConfig),
        /// Mask R-CNN (He et al. 2017): RPN, box and mask heads.
        "MaskRCNN" => MaskRcnn(TwoStageDetectorConfig),
        /// Faster R-CNN (Ren et al. 2015): RPN and box head.
        "FasterRCNN" => FasterRcnn(TwoStageDetectorConfig),
        /// mmsegmentation's encoder-decoder segmentor (UperNet, Semantic FPN).
        "EncoderDecoder" => EncoderDecoder(EncoderDecoderConfig),
    }
}

impl ModelConfig {
    /// The one-stage detector body, `None` for other models.
    pub fn detector(&self) -> Option<&DetectorConfig> {
        match self {
            Self::RetinaNet(c) | Self::Atss(c) => Some(c),
            _ => None,
        }
    }

    /// The two-stage detector body, `None` for other models.
    pub fn two_stage(&self) -> Option<&TwoStageDetectorConfig> {
        match self {
            Self::MaskRcnn(c) | Self::FasterRcnn(c) => Some(c),
            _ => None,
        }
    }

    /// Whether the model is a detector (one- or two-stage).
    pub fn is_detector(&self) -> bool {
        self.data_preprocessor().is_some()
    }

    /// The detector's data preprocessor, `None` for segmentors.
    pub fn data_preprocessor(&self) -> Option<&DataPreprocessorConfig> {
        match self {
            Self::RetinaNet(c) | Self::Atss(c) => Some(&c.data_preprocessor),
            Self::MaskRcnn(c) | Self::FasterRcnn(c) => Some(&c.data_preprocessor),
            Self::EncoderDecoder(_) => None,
        }
    }

    /// The neck table (segmentors may have none).
    pub fn neck(&self) -> Option<&NeckConfig> {
        match self {
            Self::RetinaNet(c) | Self::Atss(c) => Some(&c.neck),
            Self::MaskRcnn(c) | Self::FasterRcnn(c) => Some(&c.neck),
            Self::EncoderDecoder(c) => c.neck.as_ref(),
        }
    }

    /// The config key of the number of classes the model predicts, for messages.
    pub fn num_classes_key(&self) -> &'static str {
        match self {
            Self::RetinaNet(_) | Self::Atss(_) => "model.bbox_head.num_classes",
            Self::MaskRcnn(_) | Self::FasterRcnn(_) => "model.roi_head.bbox_head.num_classes",
            Self::EncoderDecoder(_) => "model.decode_head.num_classes",
        }
    }

    /// The segmentor body, `None` for detectors.
    pub fn segmentor(&self) -> Option<&EncoderDecoderConfig> {
        match self {
            Self::EncoderDecoder(c) => Some(c),
            _ => None,
        }
    }

    /// The backbone table.
    pub fn backbone(&self) -> &BackboneConfig {
        match self {
            Self::RetinaNet(c) | Self::Atss(c) => &c.backbone,
            Self::MaskRcnn(c) | Self::FasterRcnn(c) => &c.backbone,
            Self::EncoderDecoder(c) => &c.backbone,
        }
    }
}

/// The top-level prefixes of the state-dict keys of every model (mmdetection's and
/// mmsegmentation's): a checkpoint with none of them is a backbone-only checkpoint.
pub const STATE_DICT_PREFIXES: [&str; 7] = [
    "backbone.",
    "neck.",
    "bbox_head.",
    "rpn_head.",
    "roi_head.",
    "decode_head.",
    "auxiliary_head.",
];
