pub mod analyze;
pub mod benchmark;
pub mod browse;
pub mod convert;
pub mod eval;
pub mod features;
