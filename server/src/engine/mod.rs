//! The generation engine: scheduler, paged KV cache, sampler, detokenizer, and
//! the thread that runs them against a [`runner::ModelRunner`].

pub mod runner;
