//! densepred-engine: the whole-file configuration (`_base_` inheritance, `--set` overrides), the
//! trainer (optimizers, LR schedules, checkpoints, logging) and the tester.

pub mod backbone;
pub mod config;
pub mod curves;
pub mod device;
pub mod dist;
pub mod hooks;
pub mod inference;
pub mod loops;
#[cfg(feature = "nccl")]
mod nccl;
pub mod optim;
pub mod runner;
pub mod schedule;
pub mod tester;
pub mod trainer;
