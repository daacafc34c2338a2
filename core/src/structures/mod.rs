//! Data structures shared by heads, evaluators and the pipeline.

pub mod boxes;

pub use boxes::Boxes;
