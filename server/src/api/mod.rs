//! The two front doors. Protocol only: decode, validate, call the engine, map
//! errors to gRPC codes / HTTP statuses. `generate` holds what both share.

pub mod error;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod knowledge;
pub mod observe;
pub mod openai;
