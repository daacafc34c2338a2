//! Data structures shared by heads, evaluators and the pipeline.

pub mod boxes;
pub mod label_map;

pub use boxes::Boxes;
