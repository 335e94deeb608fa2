//! CPU implementations: what the CPU backend runs, and the reference every CUDA kernel is tested against.

pub mod attention;
