//! densepred-models: detectors and segmentors assembled from the typed `model` config.

pub mod detector;
pub mod segmentor;

pub use detector::{DataPreprocessorConfig, Detector, DetectorConfig, ModelConfig};
pub use segmentor::{slide_windows, EncoderDecoderConfig, Segmentor};
