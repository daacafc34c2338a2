//! The model-level configs: the `[model]` table (a detector or a segmentor, selected by `type`)
//! and the neck table both kinds share.

use crate::detector::DetectorConfig;
use crate::segmentor::EncoderDecoderConfig;
use densepred_backbones::BackboneConfig;
use densepred_necks::fpn::FpnConfig;
use serde::Serialize;

/// `model.neck` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum NeckConfig {
    /// Feature pyramid network.
    #[serde(rename = "FPN")]
    Fpn(FpnConfig),
}

densepred_core::deserialize_by_type!(NeckConfig {
    "FPN" => NeckConfig::Fpn [FpnConfig],
});

/// The `[model]` table, selected by `type`: a detector (mmdetection) or a segmentor
/// (mmsegmentation).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum ModelConfig {
    /// RetinaNet (Lin et al. 2017).
    RetinaNet(DetectorConfig),
    /// ATSS (Zhang et al. 2020).
    #[serde(rename = "ATSS")]
    Atss(DetectorConfig),
    /// mmsegmentation's encoder-decoder segmentor (UperNet, Semantic FPN).
    EncoderDecoder(EncoderDecoderConfig),
}

densepred_core::deserialize_by_type!(ModelConfig {
    "RetinaNet" => ModelConfig::RetinaNet [DetectorConfig],
    "ATSS" => ModelConfig::Atss [DetectorConfig],
    "EncoderDecoder" => ModelConfig::EncoderDecoder [EncoderDecoderConfig],
});

impl ModelConfig {
    /// The detector body, `None` for segmentors.
    pub fn detector(&self) -> Option<&DetectorConfig> {
        match self {
            Self::RetinaNet(c) | Self::Atss(c) => Some(c),
            Self::EncoderDecoder(_) => None,
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
            Self::EncoderDecoder(c) => &c.backbone,
        }
    }
}
