//! Safety scanners, independent of the server: what the input chain and the output stream
//! scanner decide, and why. No I/O, no async, no model runtime: a detector that needs an
//! embedding takes the vector, computed by the caller on its own embedder.

pub mod data;
pub mod injection;
pub mod pii;
pub mod stream;
pub mod toxicity;
pub mod verdict;

pub use verdict::{Action, Stage, Verdict};
