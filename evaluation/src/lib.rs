//! densepred-evaluation: COCO detection / instance-segmentation metrics with pycocotools' numbers
//! (through the `hotcoco` crate) and semantic-segmentation metrics with mmsegmentation's
//! `IoUMetric` conventions.

pub mod coco;
pub mod semseg;

/// Errors of the evaluators.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A ground-truth or results file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The offending file.
        path: std::path::PathBuf,
        /// What is wrong, naming the record and field where known.
        reason: String,
    },
    /// Inputs that do not fit together (sizes, classes, unknown ids).
    #[error("{0}")]
    Invalid(String),
}
