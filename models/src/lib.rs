//! densepred-models: detectors (and later segmentors) assembled from the typed `model` config.

pub mod detector;

pub use detector::{DataPreprocessorConfig, Detector, DetectorConfig, ModelConfig};
