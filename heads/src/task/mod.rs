//! mmdetection's task modules: prior (anchor) generators, box coders, assigners and samplers.

pub mod assigner;
pub mod coder;
pub mod prior_generator;
pub mod sampler;
pub mod topk;
