//! GenAI Factory server library: everything the `genai-factory` binary runs,
//! one module per concept.

pub mod api;
pub mod cli;
pub mod config;
pub mod device;
pub mod engine;
pub mod model;
pub mod ops;
pub mod registry;
pub mod retrieval;
pub mod serve;
pub mod state;
pub mod telemetry;
