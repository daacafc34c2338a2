//! densepred-models: detectors and segmentors assembled from the typed `model` config.

pub mod config;
pub mod detector;
pub mod segmentor;

pub use config::{ModelConfig, NeckConfig, STATE_DICT_PREFIXES};
pub use detector::{
    DataPreprocessorConfig, Detector, DetectorConfig, TwoStageDetectorConfig, TwoStageTestConfig,
    TwoStageTrainConfig,
};
pub use segmentor::{slide_windows, EncoderDecoderConfig, Segmentor};
