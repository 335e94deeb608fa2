//! The error every kernel entry point (CPU reference or CUDA launch) returns for arguments that do
//! not fit together. Invariant: the variant names the offending argument, so a caller can map it to
//! a field of its own request; nothing in this crate panics on bad shapes.

/// A shape, length or value that does not fit the kernel's contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// `what` must have exactly `expected` elements.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// `what` is outside what the kernel supports or inconsistent with another argument.
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), ShapeError> {
    if expected == got {
        Ok(())
    } else {
        Err(ShapeError::Length { what, expected, got })
    }
}

pub(crate) fn invalid(what: &'static str, why: impl Into<String>) -> ShapeError {
    ShapeError::Invalid { what, why: why.into() }
}
