//! End-to-end tests: each starts the real `genai-factory` binary (built by
//! cargo for this test target) with the real default models from `models/`.

mod harness;

mod api;
mod assistant;
mod auth;
mod engine;
mod foundation;
mod limits;
mod observability;
mod pipeline;
mod resilience;
mod retrieval;
mod safety;
mod structured;
mod tools;
