//! densepred-core: layers, tensor ops, losses and structures shared by every densepred crate
//! (see `DESIGN.md` for the layout).

pub mod config;
pub mod flops;
pub mod io;
pub mod kernel;
pub mod losses;
pub mod nn;
pub mod ops;
pub mod params;
pub mod rng;
pub mod shape_spec;
pub mod structures;
pub mod threads;
pub mod weights;

pub use shape_spec::ShapeSpec;
