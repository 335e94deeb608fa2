//! Kernels of GenAI Factory: CUDA sources (compiled to PTX/cubins by `build.rs` with
//! the `cuda` feature) and the CPU reference implementation of each, which the
//! CPU backend runs and the GPU tests compare against.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;

pub use error::ShapeError;
