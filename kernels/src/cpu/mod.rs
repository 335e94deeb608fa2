//! CPU kernels: the hot loops of the CPU backend, each with runtime ISA
//! dispatch (AVX-512 / AVX2 / portable scalar) and a scalar reference it is
//! tested against.

pub mod qmatmul;
