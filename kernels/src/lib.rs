//! Kernels of GenAI Factory: CUDA sources (compiled to PTX by `build.rs` with
//! the `cuda` feature) and the CPU reference implementation of each, which the
//! CPU backend runs and the GPU tests compare against.

pub mod cpu;
