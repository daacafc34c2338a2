//! densepred-necks: feature-pyramid necks between backbones and heads.

pub mod fpn;
