//! CPU implementations: what the CPU backend runs, and the reference every CUDA
//! kernel is tested against. Hot loops (`qmatmul`) dispatch at run time to
//! AVX-512 / AVX2 / portable scalar code, each tested against a scalar reference.

pub mod activation;
pub mod attention;
pub mod cache;
pub mod pool;
pub mod pooling;
pub mod qmatmul;
pub mod rmsnorm;
pub mod rotary;
pub mod split_k;
