//! CPU implementations: what the CPU backend runs, and the reference every CUDA kernel is tested against.

pub mod activation;
pub mod cache;
pub mod pooling;
pub mod rmsnorm;
pub mod rotary;
pub mod split_k;
