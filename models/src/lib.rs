//! densepred-models: detectors and segmentors assembled from the typed `model` config.

pub mod config;
pub mod detector;
pub mod segmentor;

pub use config::{ModelConfig, NeckConfig};
pub use detector::{DataPreprocessorConfig, Detector, DetectorConfig};
pub use segmentor::{slide_windows, EncoderDecoderConfig, Segmentor};
