//! The two front doors. Protocol only: decode, validate, call the engine, map
//! errors to gRPC codes / HTTP statuses.

pub mod grpc;
pub mod http;
pub mod knowledge;
