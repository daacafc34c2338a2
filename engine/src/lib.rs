//! densepred-engine: the whole-file configuration (`_base_` inheritance, `--set` overrides) and,
//! later, the trainer and tester built on it.

pub mod config;
